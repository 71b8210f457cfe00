"""The data-key cache: one GenerateDataKey serves many files within max age / files / bytes, keyed
by CMK list and context; concurrent misses coalesce into one KMS call; limits must be positive."""

from __future__ import annotations

import pickle
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from files_helpers import CONTEXT, flip
from kmsenv import envelope
from kmsenv.clients import EmbeddedKms
from kmsenv.envelope import DataKeyCache
from kmsenv.errors import IntegrityError, KmsError, UsageError
from test_scale_support import CountingKms, cli, new_key, read_header


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def files(folder: Path, count: int, size: int = 100) -> list[Path]:
    folder.mkdir(exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"f{i}"
        path.write_bytes(bytes([i % 256]) * size)
        paths.append(path)
    return paths


def encrypt_all(
    paths: list[Path], kms: EmbeddedKms, key: str | list[str], cache: DataKeyCache, **kw: Any
) -> list[Path]:
    outs = []
    for p in paths:
        out = p.with_name(p.name + ".cipher")
        envelope.encrypt_file(p, out, kms=kms, key_id=key, cache=cache, **kw)
        outs.append(out)
    return outs


@pytest.mark.parametrize("limit", ["max_age", "max_files", "max_bytes"])
@pytest.mark.parametrize("value", [0, -1])
def test_limits_must_be_positive(limit: str, value: int) -> None:
    with pytest.raises(UsageError, match=f"{limit} .*must be positive") as info:
        DataKeyCache(**{limit: value})
    assert info.value.hint is not None and "--no-cache" in info.value.hint


def test_bool_limit_refused() -> None:
    with pytest.raises(UsageError):
        DataKeyCache(max_files=True)


def test_one_data_key_for_many_files(tmp_path: Path, kms: EmbeddedKms, key: str) -> None:
    counting = CountingKms(kms)
    cache = DataKeyCache()
    outs = encrypt_all(files(tmp_path / "in", 20), counting, key, cache, context=CONTEXT)
    assert counting.count("GenerateDataKey") == 1
    headers = [read_header(o) for o in outs]
    assert len({h.stanzas[0].ciphertext_blob for h in headers}) == 1  # one data key ...
    assert len({h.salt for h in headers}) == 20  # ... but every file its own salt, so its own payload key
    for i, out in enumerate(outs):
        envelope.decrypt_file(out, tmp_path / f"p{i}", kms=kms)
        assert (tmp_path / f"p{i}").read_bytes() == (tmp_path / "in" / f"f{i}").read_bytes()
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["entries"]) == (19, 1, 1)
    assert stats["unwrap_misses"] == stats["unwrap_hits"] == 0  # decryption above used no cache


def test_max_files(tmp_path: Path, kms: EmbeddedKms, key: str) -> None:
    counting = CountingKms(kms)
    outs = encrypt_all(files(tmp_path / "in", 7), counting, key, DataKeyCache(max_files=3))
    assert counting.count("GenerateDataKey") == 3
    blobs = [read_header(o).stanzas[0].ciphertext_blob for o in outs]
    assert [blobs.index(b) for b in blobs] == [0, 0, 0, 3, 3, 3, 6]


def test_max_bytes_counts_file_sizes(tmp_path: Path, kms: EmbeddedKms, key: str) -> None:
    counting = CountingKms(kms)
    encrypt_all(files(tmp_path / "in", 5, size=1000), counting, key, DataKeyCache(max_bytes=2500))
    assert counting.count("GenerateDataKey") == 3  # two files per key


def test_file_over_max_bytes_gets_its_own_key(tmp_path: Path, kms: EmbeddedKms, key: str) -> None:
    counting = CountingKms(kms)
    cache = DataKeyCache(max_bytes=500)
    encrypt_all(files(tmp_path / "in", 3, size=1000), counting, key, cache)
    assert counting.count("GenerateDataKey") == 3
    assert cache.stats()["entries"] == 0  # never cached


def test_stream_bytes_are_counted_after(kms: EmbeddedKms, key: str) -> None:
    import io

    counting = CountingKms(kms)
    cache = DataKeyCache(max_bytes=1000)
    for _ in range(2):
        envelope.encrypt_stream(io.BytesIO(b"x" * 1500), io.BytesIO(), kms=counting, key_id=key, cache=cache)
    assert counting.count("GenerateDataKey") == 2


def test_max_age(tmp_path: Path, kms: EmbeddedKms, key: str) -> None:
    counting = CountingKms(kms)
    clock = Clock()
    cache = DataKeyCache(max_age=300, clock=clock)
    paths = files(tmp_path / "in", 4)
    encrypt_all(paths[:2], counting, key, cache)
    clock.now += 299
    encrypt_all(paths[2:3], counting, key, cache)
    assert counting.count("GenerateDataKey") == 1
    clock.now += 1
    encrypt_all(paths[3:], counting, key, cache)
    assert counting.count("GenerateDataKey") == 2


def test_keyed_by_cmks_and_context(tmp_path: Path, kms: EmbeddedKms, key: str) -> None:
    counting = CountingKms(kms)
    cache = DataKeyCache()
    other = new_key(kms)
    paths = files(tmp_path / "in", 1)
    for key_ids, context in [
        (key, {}),
        (key, {"a": "1"}),
        ([key, other], {}),
        ([other, key], {}),
        (key, {"a": "1"}),  # cached
        ([key, other], {}),  # cached
    ]:
        out = tmp_path / "out.cipher"
        envelope.encrypt_file(paths[0], out, kms=counting, key_id=key_ids, context=context, cache=cache, force=True)
        header = read_header(out)
        assert dict(header.context) == context
        expected = [key_ids] if isinstance(key_ids, str) else key_ids
        assert [s.key_arn for s in header.stanzas] == [kms.service.key_arn(k) for k in expected]
    assert counting.count("GenerateDataKey") == 4


class SlowKms(CountingKms):
    """GenerateDataKey takes a while (and may fail): the window in which other threads must wait."""

    def __init__(self, other: EmbeddedKms, fail: bool = False) -> None:
        super().__init__(other)
        self.fail = fail

    def call(self, action: str, params: dict[str, str]) -> dict[str, Any]:
        if action == "GenerateDataKey":
            time.sleep(0.3)
            if self.fail:
                self.calls.append((action, params))
                raise KmsError("Rejected.Disabled", "The key is disabled.")
        return super().call(action, params)


@pytest.mark.parametrize("fail", [False, True])
def test_concurrent_misses_coalesce(tmp_path: Path, kms: EmbeddedKms, key: str, fail: bool) -> None:
    slow = SlowKms(kms, fail=fail)
    cache = DataKeyCache()
    paths = files(tmp_path / "in", 8)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(paths))

    def work(p: Path) -> None:
        barrier.wait()
        try:
            envelope.encrypt_file(p, p.with_name(p.name + ".cipher"), kms=slow, key_id=key, cache=cache, threads=1)
        except KmsError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(p,)) for p in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert slow.count("GenerateDataKey") == 1
    if fail:
        assert len(errors) == 8  # every waiting thread got the one refusal
        assert not list((tmp_path / "in").glob("*.cipher"))
    else:
        assert errors == []
        assert len({read_header(p.with_name(p.name + ".cipher")).salt for p in paths}) == 8


def test_cache_hides_and_refuses_pickling(tmp_path: Path, kms: EmbeddedKms, key: str) -> None:
    cache = DataKeyCache()
    encrypt_all(files(tmp_path / "in", 1), kms, key, cache)
    assert "hits=0, misses=1" in repr(cache)
    with pytest.raises(TypeError):
        pickle.dumps(cache)
    cache.clear()
    assert cache.stats()["entries"] == 0


@pytest.mark.parametrize(
    "option",
    [("--cache-max-files", "0"), ("--cache-max-age", "0"), ("--cache-max-bytes", "0"), ("--cache-max-age=-5m",)],
)
def test_cli_zero_limit_is_refused(
    tmp_path: Path, key: str, capsys: pytest.CaptureFixture[str], option: tuple[str, ...]
) -> None:
    src = tmp_path / "f"
    src.write_bytes(b"data")
    rc, _, err = cli(capsys, "encrypt", "--key-id", key, *option, str(src))
    assert rc == 2
    assert "must be positive" in err and "--no-cache" in err
    assert not (tmp_path / "f.cipher").exists()


def test_cli_size_and_age_units(tmp_path: Path, key: str, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "f"
    src.write_bytes(b"data")
    rc, _, err = cli(capsys, "encrypt", "--key-id", key, "--cache-max-bytes", "1G", "--cache-max-age", "90s", str(src))
    assert (rc, err) == (0, "")
    with pytest.raises(SystemExit):
        cli(capsys, "encrypt", "--key-id", key, "--cache-max-age", "soon", str(src))


# ------------------------------------------------------------------------- decryption side --


class KeepOpenKms(CountingKms):
    """A counting KMS a CLI run may close without closing the test's KMS service."""

    def close(self) -> None:
        pass


def test_decrypt_reuses_unwrapped_data_keys(tmp_path: Path, kms: EmbeddedKms, key: str) -> None:
    """Files sharing one wrapped data key cost one KMS Decrypt with a cache, one each without."""
    outs = encrypt_all(files(tmp_path / "in", 12), kms, key, DataKeyCache(), context=CONTEXT)
    for cache, calls in [(DataKeyCache(), 1), (None, 12)]:
        counting = CountingKms(kms)
        for i, out in enumerate(outs):
            plain = tmp_path / f"p{i}"
            envelope.decrypt_file(out, plain, kms=counting, cache=cache, force=True)
            assert plain.read_bytes() == (tmp_path / "in" / f"f{i}").read_bytes()
        assert counting.count("Decrypt") == calls
        if cache is not None:
            stats = cache.stats()
            assert (stats["unwrap_misses"], stats["unwrap_hits"], stats["unwrapped"]) == (1, 11, 1)
            cache.clear()
            assert cache.stats()["unwrapped"] == 0


def test_cached_unwrap_still_authenticates_each_header(tmp_path: Path, kms: EmbeddedKms, key: str) -> None:
    """A cache hit replaces only the KMS call: a file whose header was altered (same wrapped key)
    still fails its commitment check, and its output never appears."""
    outs = encrypt_all(files(tmp_path / "in", 2), kms, key, DataKeyCache())
    flip(outs[1], outs[1].read_bytes().index(read_header(outs[1]).salt))  # the salt: the blob is intact
    cache = DataKeyCache()
    envelope.decrypt_file(outs[0], tmp_path / "ok", kms=kms, cache=cache)
    with pytest.raises(IntegrityError):
        envelope.decrypt_file(outs[1], tmp_path / "bad", kms=kms, cache=cache)
    assert cache.stats()["unwrap_hits"] == 1  # the KMS was not asked: the header check caught it
    assert not (tmp_path / "bad").exists()


def test_unwrapped_keys_expire_and_are_keyed_by_context(tmp_path: Path, kms: EmbeddedKms, key: str) -> None:
    clock = Clock()
    cache = DataKeyCache(max_age=60, clock=clock)
    counting = CountingKms(kms)
    outs = encrypt_all(files(tmp_path / "in", 3), kms, key, DataKeyCache(), context=CONTEXT)
    envelope.decrypt_file(outs[0], tmp_path / "p0", kms=counting, cache=cache)
    clock.now += 59
    envelope.decrypt_file(outs[1], tmp_path / "p1", kms=counting, cache=cache)
    assert counting.count("Decrypt") == 1
    clock.now += 1
    envelope.decrypt_file(outs[2], tmp_path / "p2", kms=counting, cache=cache)
    assert counting.count("Decrypt") == 2  # max_age reached: the KMS is asked again
    other = CountingKms(kms)  # another KMS object never gets this one's answers
    envelope.decrypt_file(outs[2], tmp_path / "p3", kms=other, cache=cache)
    assert other.count("Decrypt") == 1


def test_unwrap_errors_are_not_cached(tmp_path: Path, kms: EmbeddedKms, key: str) -> None:
    outs = encrypt_all(files(tmp_path / "in", 1), kms, key, DataKeyCache())
    cache = DataKeyCache()
    kms.service.disable_key(key_id=key)
    with pytest.raises(KmsError):
        envelope.decrypt_file(outs[0], tmp_path / "p", kms=kms, cache=cache)
    kms.service.enable_key(key_id=key)
    envelope.decrypt_file(outs[0], tmp_path / "p", kms=kms, cache=cache)
    assert cache.stats()["unwrap_misses"] == 1


@pytest.mark.parametrize(("options", "calls"), [([], 1), (["--no-cache"], 6)])
def test_cli_decrypt_folder_counts_kms_calls(
    tmp_path: Path,
    kms: EmbeddedKms,
    *,
    key: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    options: list[str],
    calls: int,
) -> None:
    """`decrypt -r` of a folder encrypted under one cached data key: one KMS Decrypt for the run."""
    from kmsenv.cli import files as cli_files

    files(tmp_path / "in", 6)
    rc, _, err = cli(capsys, "encrypt", "-r", str(tmp_path / "in"), "-o", str(tmp_path / "enc"), "--key-id", key)
    assert rc == 0, err
    counting = KeepOpenKms(kms)
    monkeypatch.setattr(cli_files, "open_kms", lambda _args: counting)
    rc, _, err = cli(capsys, "decrypt", "-r", str(tmp_path / "enc"), "-o", str(tmp_path / "dec"), "-v", *options)
    assert rc == 0, err
    assert counting.count("Decrypt") == calls
    assert sorted(p.name for p in (tmp_path / "dec").iterdir()) == [f"f{i}" for i in range(6)]
    if not options:
        assert "1 KMS Decrypt call(s)" in err
