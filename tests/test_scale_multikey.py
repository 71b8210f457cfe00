"""Several CMKs per file: encrypt wraps one data key under each ``--key-id``; decrypt tries the
wrapped keys the caller can use, in order, falls through on refusals, and says which one worked."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from files_helpers import CHUNK, CONTEXT, SALES, names
from kmsenv import envelope
from kmsenv.clients import EmbeddedKms
from kmsenv.errors import ConfigError, IntegrityError, KmsError, UsageError
from test_scale_support import CountingKms, cli, json_lines, new_key, read_header, restanza


@pytest.fixture
def keys(kms: EmbeddedKms, key: str) -> list[str]:
    """Three CMKs: the reference alias's key first."""
    return [key, new_key(kms), new_key(kms)]


@pytest.fixture
def plain(tmp_path: Path) -> Path:
    path = tmp_path / "sales.csv"
    path.write_bytes(SALES * 30)
    return path


@pytest.fixture
def multi(plain: Path, tmp_path: Path, kms: EmbeddedKms, keys: list[str]) -> Path:
    out = tmp_path / "sales.csv.cipher"
    envelope.encrypt_file(plain, out, kms=kms, key_id=keys, context=CONTEXT, chunk_size=CHUNK)
    return out


def test_encrypt_generates_once_and_encrypts_under_the_others(
    plain: Path, tmp_path: Path, kms: EmbeddedKms, keys: list[str]
) -> None:
    counting = CountingKms(kms)
    envelope.encrypt_file(plain, tmp_path / "c", kms=counting, key_id=keys, context=CONTEXT)
    assert [name for name, _ in counting.calls] == ["GenerateDataKey", "Encrypt", "Encrypt"]
    assert counting.calls[0][1]["KeyId"] == keys[0]
    assert [params["KeyId"] for _, params in counting.calls[1:]] == keys[1:]
    header = read_header(tmp_path / "c")
    assert [s.key_arn for s in header.stanzas] == [kms.service.key_arn(k) for k in keys]


@pytest.mark.parametrize("usable", [0, 1, 2])
def test_any_one_key_decrypts(multi: Path, plain: Path, kms: EmbeddedKms, keys: list[str], usable: int) -> None:
    for i, k in enumerate(keys):
        if i != usable:
            kms.service.disable_key(key_id=k)
    result = envelope.decrypt_file_result(multi, multi.with_suffix(".p"), kms=kms)
    assert multi.with_suffix(".p").read_bytes() == plain.read_bytes()
    assert result.stanza == usable + 1
    assert result.key_id == keys[usable]
    assert [o.code for o in result.outcomes] == ["Rejected.Disabled"] * usable + ["ok"] + ["NotTried"] * (2 - usable)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(disabled=st.sets(st.integers(0, 2)))
def test_first_usable_key_wins(
    multi: Path, outdir: Path, kms: EmbeddedKms, keys: list[str], disabled: set[int]
) -> None:
    for i, k in enumerate(keys):
        (kms.service.disable_key if i in disabled else kms.service.enable_key)(key_id=k)
    target = outdir / "p"
    target.unlink(missing_ok=True)
    usable = [i for i in range(3) if i not in disabled]
    if not usable:
        with pytest.raises(KmsError) as info:
            envelope.decrypt_file(multi, target, kms=kms)
        assert info.value.code == "Rejected.Disabled"
        assert info.value.message.count("Rejected.Disabled") == 3  # every stanza's code is listed
        assert names(outdir) == []
        return
    assert envelope.decrypt_file_result(multi, target, kms=kms).stanza == usable[0] + 1


def test_named_key_restricts_what_is_tried(multi: Path, outdir: Path, kms: EmbeddedKms, keys: list[str]) -> None:
    counting = CountingKms(kms)
    arn = kms.service.key_arn(keys[2])
    result = envelope.decrypt_file_result(multi, outdir / "p", kms=counting, key_ids=[arn])  # an ARN works too
    assert result.stanza == 3
    assert counting.count("Decrypt") == 1  # the first two stanzas were not even tried
    assert [o.code for o in result.outcomes] == ["NotNamed", "NotNamed", "ok"]


def test_named_key_refused_does_not_fall_back_without_discovery(
    multi: Path, outdir: Path, kms: EmbeddedKms, keys: list[str]
) -> None:
    kms.service.disable_key(key_id=keys[1])
    counting = CountingKms(kms)
    with pytest.raises(KmsError) as info:
        envelope.decrypt_file(multi, outdir / "p", kms=counting, key_ids=[keys[1]])
    assert counting.count("Decrypt") == 1
    assert "#2" in info.value.message and "NotNamed" in info.value.message
    assert names(outdir) == []
    # --discovery: the named key first, then the others in header order.
    result = envelope.decrypt_file_result(multi, outdir / "p", kms=counting, key_ids=[keys[1]], discovery=True)
    assert result.stanza == 1
    assert [o.code for o in result.outcomes] == ["ok", "Rejected.Disabled", "NotTried"]


def test_discovery_tries_named_keys_first(multi: Path, outdir: Path, kms: EmbeddedKms, keys: list[str]) -> None:
    counting = CountingKms(kms)
    result = envelope.decrypt_file_result(multi, outdir / "p", kms=counting, key_ids=[keys[2]], discovery=True)
    assert result.stanza == 3
    assert counting.count("Decrypt") == 1


def test_key_not_in_file(multi: Path, outdir: Path, kms: EmbeddedKms) -> None:
    other = new_key(kms)
    with pytest.raises(ConfigError, match="none of the file's wrapped keys is under a key id you named"):
        envelope.decrypt_file(multi, outdir / "p", kms=kms, key_ids=[other])
    assert names(outdir) == []


def test_alias_cannot_select_stanzas(multi: Path, outdir: Path, kms: EmbeddedKms) -> None:
    with pytest.raises(UsageError, match="alias"):
        envelope.decrypt_file(multi, outdir / "p", kms=kms, key_ids=["alias/Apollo/WorkKey"])


def test_stanza_lying_about_its_key_is_refused(multi: Path, outdir: Path, kms: EmbeddedKms, keys: list[str]) -> None:
    """A stanza naming key 2 whose blob is under key 1: naming key 2 must not open it."""
    header = read_header(multi)
    liar = dataclasses.replace(header.stanzas[0], key_arn=header.stanzas[1].key_arn)
    restanza(multi, kms, [liar])
    with pytest.raises(IntegrityError, match="not under the key"):
        envelope.decrypt_file(multi, outdir / "p", kms=kms, key_ids=[keys[1]])
    assert names(outdir) == []
    envelope.decrypt_file(multi, outdir / "p", kms=kms)  # without names the KMS's answer is what counts


def test_other_provider_is_skipped(multi: Path, outdir: Path, kms: EmbeddedKms) -> None:
    header = read_header(multi)
    foreign = dataclasses.replace(header.stanzas[0], provider="aws-kms", key_arn="arn:aws:kms:eu-west-1:1:key/x")
    restanza(multi, kms, [foreign, header.stanzas[1]])
    result = envelope.decrypt_file_result(multi, outdir / "p", kms=kms)
    assert [o.code for o in result.outcomes] == ["OtherProvider", "ok"]
    restanza(multi, kms, [foreign])
    with pytest.raises(ConfigError, match="only for KMS provider"):
        envelope.decrypt_file(multi, outdir / "q", kms=kms)
    assert names(outdir) == ["p"]


def test_tampered_second_stanza_stops_everything(multi: Path, outdir: Path, kms: EmbeddedKms, keys: list[str]) -> None:
    data = bytearray(multi.read_bytes())
    header = read_header(multi)
    blob = header.stanzas[1].ciphertext_blob
    data[data.index(blob) + len(blob) - 1] ^= 1
    multi.write_bytes(bytes(data))
    kms.service.disable_key(key_id=keys[0])
    with pytest.raises((IntegrityError, KmsError)):
        envelope.decrypt_file(multi, outdir / "p", kms=kms)
    kms.service.enable_key(key_id=keys[0])
    with pytest.raises(IntegrityError):  # stanza 1 opens, but the header tag covers stanza 2
        envelope.decrypt_file(multi, outdir / "p", kms=kms)
    assert names(outdir) == []


def test_duplicate_or_missing_key_ids(plain: Path, outdir: Path, kms: EmbeddedKms, key: str) -> None:
    with pytest.raises(UsageError, match="twice"):
        envelope.encrypt_file(plain, outdir / "c", kms=kms, key_id=[key, key])
    with pytest.raises(UsageError, match="at least one"):
        envelope.encrypt_file(plain, outdir / "c", kms=kms, key_id=[])
    assert names(outdir) == []


# -------------------------------------------------------------------------------- CLI --


def test_cli_several_key_ids(
    plain: Path, outdir: Path, kms: EmbeddedKms, keys: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    args = [a for k in keys for a in ("--key-id", k)]
    rc, _, err = cli(capsys, "encrypt", *args, str(plain), "-o", str(outdir / "c"))
    assert (rc, err) == (0, "")
    assert len(read_header(outdir / "c").stanzas) == 3
    kms.service.disable_key(key_id=keys[0])
    meta = outdir / "meta.jsonl"
    rc, _, err = cli(
        capsys, "decrypt", "-v", "--metadata-output", str(meta), str(outdir / "c"), "-o", str(outdir / "p")
    )
    assert rc == 0
    assert f"wrapped key #2 of 3: {kms.service.key_arn(keys[1])}" in err
    (line,) = json_lines(meta.read_text())
    assert line["outcome"] == "ok"
    assert line["decrypted_with"]["key_id"] == keys[1]
    assert line["decrypted_with"]["stanza"] == 2
    assert [w["code"] for w in line["wrapped_keys"]] == ["Rejected.Disabled", "ok", "NotTried"]
    assert line["plaintext_size"] == plain.stat().st_size


def test_cli_decrypt_key_selection_errors(
    multi: Path, outdir: Path, kms: EmbeddedKms, keys: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    other = new_key(kms)
    meta = outdir / "meta.jsonl"
    rc, _, err = cli(
        capsys, "decrypt", "--key-id", other, "--metadata-output", str(meta), str(multi), "-o", str(outdir / "p")
    )
    assert rc == 9
    assert "NotNamed" in err and "--discovery" in err
    (line,) = json_lines(meta.read_text())
    assert line["outcome"] == "failed" and line["error"]["class"] == "ConfigError"
    rc, _, err = cli(capsys, "decrypt", "--key-id", other, "--discovery", str(multi), "-o", str(outdir / "p"))
    assert rc == 0
    rc, _, err = cli(capsys, "decrypt", "--key-id", "alias/x", str(multi), "-o", str(outdir / "q"))
    assert rc == 2
    for k in keys:
        kms.service.disable_key(key_id=k)
    rc, _, err = cli(capsys, "decrypt", str(multi), "-o", str(outdir / "q"))
    assert rc == 3
    assert err.count("Rejected.Disabled") >= 3
    assert not (outdir / "q").exists()


def test_legacy_file_and_named_keys(tmp_path: Path, outdir: Path, kms: EmbeddedKms, key: str) -> None:
    from files_helpers import sample_encrypt

    legacy = sample_encrypt(kms, tmp_path)
    with pytest.raises(ConfigError, match="not under a key id you named"):
        envelope.decrypt_file(legacy, outdir / "p", kms=kms, key_ids=[new_key(kms)])
    assert names(outdir) == []
    result = envelope.decrypt_file_result(legacy, outdir / "p", kms=kms, key_ids=[key])
    assert (result.format, result.key_id, result.stanza) == ("legacy-aes-eax", key, None)
