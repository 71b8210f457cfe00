"""The reference document's sample encryption, ported to Python 3, for comparison only.

It reads the whole file into memory, encrypts it with AES-EAX under a data key and writes four
base64 lines (wrapped data key, nonce, ciphertext, tag). The data key is local random bytes here:
the one KMS call is not what is being measured. Usage: reference_sample.py INPUT OUTPUT
"""

from __future__ import annotations

import base64
import os
import sys

from Crypto.Cipher import AES


def main() -> int:
    src, dst = sys.argv[1], sys.argv[2]
    data_key = os.urandom(32)
    with open(src, "rb") as f:
        content = f.read()
    cipher = AES.new(data_key, AES.MODE_EAX)
    ciphertext, tag = cipher.encrypt_and_digest(content)
    lines = [base64.b64encode(b"wrapped-data-key-placeholder"), base64.b64encode(cipher.nonce)]
    lines += [base64.b64encode(ciphertext), base64.b64encode(tag)]
    with open(dst, "wb") as f:
        for line in lines:
            f.write(line + b"\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
