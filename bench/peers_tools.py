"""The peers of bench/bench_peers.py, one tool per process: each encrypts or decrypts a file, then fsyncs it.

bench_peers.py runs this script once per (tool, operation) so that wait4 reports the peak RSS of
that tool alone; each branch imports only its own library. Every output is fsynced (file, then its
folder) before the process exits, because kmsenv's atomic output does the same: without it a peer
would be timed writing into the page cache while kmsenv is timed writing to the disk.

How each peer is driven (its fastest streaming API, where it has one):

- ``age``: pyrage ``encrypt_file``/``decrypt_file`` with an X25519 recipient. These stream (the
  Rust side copies through age's 64 KiB ChaCha20-Poly1305 chunks); pyrage's ``encrypt``/
  ``decrypt`` would take and return the whole file as one ``bytes``.
- ``tink``: ``tink.streaming_aead`` with the ``AES256_GCM_HKDF_1MB`` template (1 MiB segments, as
  kmsenv's 1 MiB chunks), copying 1 MiB reads through the encrypting/decrypting stream.
- ``esdk``: the AWS Encryption SDK's ``stream()`` with a raw AES-256 keyring (Material Providers
  Library), the committing suite without signatures (``AES_256_GCM_HKDF_SHA512_COMMIT_KEY``:
  kmsenv does not sign either) and 1 MiB frames, as kmsenv's chunks (the SDK's README advises large
  frames for large files: its default 4 KiB frames measured ~8x slower, 52 vs 431 MiB/s in-process).
- ``reference``: bench/reference_sample.py's ``main`` as it is (whole file in memory, AES-EAX,
  base64 lines), with its data key fixed by this script so that the file can be decrypted again
  (the sample throws the key away); decryption is the same approach in reverse.

Usage: peers_tools.py keys KEYDIR | peers_tools.py TOOL encrypt|decrypt KEYDIR SRC DST
"""

from __future__ import annotations

import base64
import os
import sys
import types
from pathlib import Path
from typing import Any

TOOLS = ("age", "tink", "esdk", "reference")
COPY = 1 << 20  # read size where the harness copies through a stream object


def fsync_output(path: str) -> None:
    """Make ``path`` durable: its data, then the folder entry (as kmsenv's atomic output does)."""
    for target, flags in ((path, os.O_RDONLY), (os.path.dirname(os.path.abspath(path)), os.O_RDONLY)):
        fd = os.open(target, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def copy_stream(src: Any, dst: Any) -> None:
    while chunk := src.read(COPY):
        dst.write(chunk)


def make_keys(keydir: Path) -> None:
    """One key per tool, written to ``keydir`` (the harness's stand-in for a KMS)."""
    import pyrage
    import tink
    from tink import secret_key_access, streaming_aead

    keydir.mkdir(parents=True, exist_ok=True)
    (keydir / "age.key").write_text(str(pyrage.x25519.Identity.generate()))
    streaming_aead.register()
    handle = tink.new_keyset_handle(streaming_aead.streaming_aead_key_templates.AES256_GCM_HKDF_1MB)
    (keydir / "tink.json").write_text(tink.json_proto_keyset_format.serialize(handle, secret_key_access.TOKEN))
    (keydir / "esdk.key").write_bytes(os.urandom(32))
    (keydir / "reference.key").write_bytes(os.urandom(32))


def run_age(mode: str, keydir: Path, src: str, dst: str) -> None:
    import pyrage

    identity = pyrage.x25519.Identity.from_str((keydir / "age.key").read_text().strip())
    if mode == "encrypt":
        pyrage.encrypt_file(src, dst, [identity.to_public()])
    else:
        pyrage.decrypt_file(src, dst, [identity])


def run_tink(mode: str, keydir: Path, src: str, dst: str) -> None:
    import tink
    from tink import secret_key_access, streaming_aead

    streaming_aead.register()
    handle = tink.json_proto_keyset_format.parse((keydir / "tink.json").read_text(), secret_key_access.TOKEN)
    primitive = handle.primitive(streaming_aead.StreamingAead)
    if mode == "encrypt":
        # The encrypting stream closes the file it writes to when it is closed.
        with open(src, "rb") as plain, primitive.new_encrypting_stream(open(dst, "wb"), b"") as enc:
            copy_stream(plain, enc)
    else:
        with primitive.new_decrypting_stream(open(src, "rb"), b"") as dec, open(dst, "wb") as plain:
            copy_stream(dec, plain)


def run_esdk(mode: str, keydir: Path, src: str, dst: str) -> None:
    import aws_encryption_sdk
    from aws_cryptographic_material_providers.mpl import AwsCryptographicMaterialProviders
    from aws_cryptographic_material_providers.mpl.config import MaterialProvidersConfig
    from aws_cryptographic_material_providers.mpl.models import AesWrappingAlg, CreateRawAesKeyringInput
    from aws_encryption_sdk.identifiers import Algorithm

    keyring = AwsCryptographicMaterialProviders(config=MaterialProvidersConfig()).create_raw_aes_keyring(
        input=CreateRawAesKeyringInput(
            key_namespace="bench",
            key_name="peers",
            wrapping_key=(keydir / "esdk.key").read_bytes(),
            wrapping_alg=AesWrappingAlg.ALG_AES256_GCM_IV12_TAG16,
        )
    )
    client = aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=aws_encryption_sdk.CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
    )
    with open(src, "rb") as source, open(dst, "wb") as out:
        if mode == "encrypt":
            options: dict[str, Any] = {"algorithm": Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY, "frame_length": COPY}
            with client.stream(mode="e", source=source, keyring=keyring, **options) as stream:
                copy_stream(stream, out)
        else:
            # decrypt-unsigned: refuses signed messages, so a signature is never silently expected or skipped
            with client.stream(mode="decrypt-unsigned", source=source, keyring=keyring) as stream:
                copy_stream(stream, out)


def run_reference(mode: str, keydir: Path, src: str, dst: str) -> None:
    key = (keydir / "reference.key").read_bytes()
    if mode == "encrypt":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import reference_sample

        # The sample's data key comes from os.urandom(32) and is then lost; hand it ours instead
        # (only the sample's own name `os` is replaced, so the cipher's nonce stays random).
        reference_sample.os = types.SimpleNamespace(urandom=lambda n: key[:n])  # type: ignore[attr-defined]
        sys.argv = ["reference_sample.py", src, dst]
        if reference_sample.main() != 0:
            raise SystemExit("reference_sample.py failed")
        return
    from Crypto.Cipher import AES

    with open(src, "rb") as f:
        # Line by line, as the sample wrote them: no extra copy of the whole file for a split.
        _wrapped, nonce, ciphertext, tag = (base64.b64decode(f.readline()) for _ in range(4))
    plain = AES.new(key, AES.MODE_EAX, nonce=nonce).decrypt_and_verify(ciphertext, tag)
    with open(dst, "wb") as out:
        out.write(plain)


RUNNERS = {"age": run_age, "tink": run_tink, "esdk": run_esdk, "reference": run_reference}


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "keys":
        make_keys(Path(argv[1]))
        return 0
    if len(argv) != 5 or argv[0] not in RUNNERS or argv[1] not in ("encrypt", "decrypt"):
        print(__doc__, file=sys.stderr)
        return 2
    tool, mode, keydir, src, dst = argv
    RUNNERS[tool](mode, Path(keydir), src, dst)
    fsync_output(dst)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
