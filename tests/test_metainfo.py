"""Bencode bounds, .atorrent parsing/making/anonymizing, checked against libtorrent.

libtorrent (its Python bindings) is the independent implementation: the same
files and piece length must give the same infohash, and libtorrent must read
what we write.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Any

import libtorrent as lt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anomos import bencode
from anomos.errors import AnomosError, ConfigError, MetainfoError, ProtocolError, StorageError
from anomos.torrent import metainfo as mi
from anomos.torrent.metainfo import (
    FileEntry,
    Metainfo,
    anonymize,
    auto_piece_length,
    make_metainfo,
)

TRACKER = "https://tracker.example:8443/anomos"
FP = hashlib.sha256(b"tracker key").hexdigest()


def write(path: Path, size: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(random.Random(seed).randbytes(size))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A nested folder whose names sort differently per component and as whole paths."""
    root = tmp_path / "share"
    write(root / "zz.bin", 70_001, 1)
    write(root / "a.txt", 16_384, 2)
    write(root / "a" / "q", 5, 3)
    write(root / "a b" / "q", 33_000, 4)
    write(root / "B", 1, 5)
    write(root / "sub" / "deeper" / "y", 100_000, 6)
    (root / "sub" / "empty.dat").write_bytes(b"")
    write(root / ".hidden", 700, 7)
    return root


def lt_make(path: Path, piece_length: int, *, private: bool = False, **extra: Any) -> bytes:
    """libtorrent's v1 torrent of ``path``, its file list sorted by path as we document."""
    files = sorted(lt.list_files(str(path)), key=lambda f: f.filename.encode())
    ct = lt.create_torrent(files, piece_length, flags=lt.create_torrent.v1_only)
    if private:
        ct.set_priv(True)
    for url in extra.get("trackers", ()):
        ct.add_tracker(url)
    for url in extra.get("url_seeds", ()):
        ct.add_url_seed(url)
    for node in extra.get("nodes", ()):
        ct.add_node(*node)
    if "comment" in extra:
        ct.set_comment(extra["comment"])
    lt.set_piece_hashes(ct, str(path.parent))
    return bytes(lt.bencode(ct.generate()))


def lt_info(data: bytes) -> lt.torrent_info:
    return lt.torrent_info(lt.bdecode(data))


# ----------------------------------------------------------------------------- bencode


def test_bencode_round_trip_and_str_keys():
    value = {b"b": [1, -2, b"x"], b"a": {b"nested": b""}}
    data = bencode.encode(value)
    assert data == b"d1:ad6:nested0:e1:bli1ei-2e1:xee"
    assert bencode.decode(data) == value
    assert bencode.encode({"z": "é", b"a": 0}) == b"d1:ai0e1:z2:\xc3\xa9e"
    with pytest.raises(TypeError):
        bencode.encode({b"a": 1.5})
    with pytest.raises(TypeError):
        bencode.encode({"a": 1, b"a": 2})


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"i01e", "leading zero"),
        (b"d1:bi1e1:ai2ee", "disordered"),
        (b"d1:ai1e1:ai2ee", "disordered"),
        (b"4:abc", "underflow"),
        (b"i1ejunk", "junk"),
        (b"99999999999999999999:x", "too large|invalid length"),
        (b"l" * 33 + b"e" * 33, "nesting deeper than 32"),
        (b"d1:a" * 40 + b"i0e" + b"e" * 40, "nesting deeper than 32"),
    ],
)
def test_bencode_refuses_malformed(data: bytes, message: str):
    with pytest.raises(bencode.BencodeError, match=message) as info:
        bencode.decode(data)
    assert isinstance(info.value, ProtocolError)
    assert "\n" not in str(info.value) and str(info.value).startswith("bencode: ")


def test_bencode_size_and_depth_bounds():
    with pytest.raises(bencode.BencodeError, match="over the limit of 10"):
        bencode.decode(b"11:hello world", max_size=10)
    assert bencode.decode(b"l" * 32 + b"e" * 32) is not None
    # A million-deep list is refused before the decoder sees it.
    with pytest.raises(bencode.BencodeError, match="nesting"):
        bencode.decode(b"l" * 1_000_000 + b"e" * 1_000_000)
    # Brackets inside string bodies do not count as nesting.
    assert bencode.decode(b"l40:" + b"l" * 40 + b"e") == [b"l" * 40]


# ----------------------------------------------------------------------------- libtorrent agreement


@pytest.mark.parametrize("piece_length", [16384, 32768, 65536])
def test_multi_file_infohash_matches_libtorrent(tree: Path, piece_length: int):
    meta = make_metainfo(tree, trackers=[TRACKER], piece_length=piece_length, progress=False)
    ref = lt_info(lt_make(tree, piece_length))
    assert meta.infohash == ref.info_hashes().v1.to_bytes()
    assert meta.info_bytes == ref.info_section()
    assert meta.multi_file and meta.name == "share"
    assert meta.total_length == ref.total_size() == 220_091
    assert meta.piece_count == ref.num_pieces()
    assert [meta.piece_size(i) for i in range(meta.piece_count)] == [
        ref.piece_size(i) for i in range(ref.num_pieces())
    ]


def test_single_file_infohash_matches_libtorrent(tmp_path: Path):
    path = tmp_path / "movie.mkv"
    write(path, 300_000, 9)
    meta = make_metainfo(path, trackers=[TRACKER], piece_length=65536, progress=False)
    ref = lt_info(lt_make(path, 65536))
    assert meta.infohash == ref.info_hashes().v1.to_bytes()
    assert not meta.multi_file
    assert meta.files == (FileEntry(path=("movie.mkv",), length=300_000, offset=0),)
    assert set(meta.info) == {b"length", b"name", b"piece length", b"pieces"}
    assert meta.piece_size(meta.piece_count - 1) == 300_000 - 4 * 65536


def test_private_flag_matches_libtorrent(tmp_path: Path):
    path = tmp_path / "f"
    write(path, 20_000, 3)
    meta = make_metainfo(path, trackers=[TRACKER], piece_length=16384, private=True, progress=False)
    assert meta.private and meta.info[b"private"] == 1
    assert meta.infohash == lt_info(lt_make(path, 16384, private=True)).info_hashes().v1.to_bytes()
    plain = make_metainfo(path, trackers=[TRACKER], piece_length=16384, progress=False)
    assert plain.infohash != meta.infohash and b"private" not in plain.info


def test_file_order_is_libtorrents_canonical_order(tree: Path):
    """libtorrent v1-only keeps directory-listing order (it depends on the file
    system); its canonical order (v2/hybrid) sorts whole paths as bytes, as
    mktorrent does. We always use that order; pad files aside, they agree."""
    meta = make_metainfo(tree, trackers=[TRACKER], piece_length=16384, progress=False)
    flags = lt.create_torrent.v1_only | lt.create_torrent.canonical_files
    ct = lt.create_torrent(lt.list_files(str(tree)), 16384, flags=flags)
    fs = ct.files()
    canonical = [
        fs.file_path(i)
        for i in range(fs.num_files())
        if not fs.file_flags(i) & lt.file_storage.flag_pad_file
    ]
    ours = ["/".join(f.path) for f in meta.files]
    assert ours == canonical
    assert ours[:4] == ["share/.hidden", "share/B", "share/a b/q", "share/a.txt"]


def unwrap(atorrent: bytes) -> bytes:
    """The .atorrent's info dict as a plain torrent, as someone checking it would do."""
    return bencode.encode({b"info": bencode.decode(atorrent)[b"anomos-info"]})


def test_libtorrent_refuses_our_atorrent(tree: Path, tmp_path: Path):
    """A BitTorrent client cannot add an .atorrent, so it never announces the
    infohash to the public DHT (issue 12); the infohash stays checkable."""
    meta = make_metainfo(
        tree, trackers=[TRACKER, "https://[::1]:9/x"], fingerprint=FP, progress=False
    )
    data = meta.to_bytes()
    with pytest.raises(RuntimeError, match="info"):
        lt.torrent_info(data)
    with pytest.raises(RuntimeError, match="info"):
        lt.load_torrent_buffer(data)
    session = lt.session({"enable_dht": False, "enable_lsd": False, "listen_interfaces": ""})
    params = lt.add_torrent_params()
    params.save_path = str(tmp_path)
    with pytest.raises(RuntimeError, match="info"):
        params.ti = lt.torrent_info(lt.bdecode(data))
        session.add_torrent(params)
    assert not session.get_torrents()
    # The info dict inside is byte for byte the one libtorrent makes: same infohash.
    atp = lt.load_torrent_buffer(unwrap(data))
    assert atp.ti.info_hashes().v1.to_bytes() == meta.infohash
    assert meta.infohash == lt_info(lt_make(tree, meta.piece_length)).info_hashes().v1.to_bytes()
    fs = atp.ti.layout()
    assert [
        (fs.file_path(i), fs.file_size(i), fs.file_offset(i)) for i in range(fs.num_files())
    ] == [("/".join(f.path), f.length, f.offset) for f in meta.files]
    assert list(atp.trackers) == []  # nothing outside info names the anomos tracker


def test_old_format_atorrent_is_still_read(tree: Path):
    """Version 1 (info at the top, as a .torrent) is read, marked legacy, rewritten as 2."""
    meta = make_metainfo(tree, trackers=[TRACKER], fingerprint=FP, progress=False)
    anomos = {b"version": 1, b"trackers": [TRACKER.encode()], b"fingerprint": FP.encode()}
    old = bencode.encode({b"anomos": anomos, b"announce": TRACKER.encode(), b"info": meta.info})
    loaded = Metainfo.from_bytes(old)
    assert loaded.legacy and loaded.is_anomos
    assert (loaded.infohash, loaded.trackers, loaded.fingerprint) == (
        meta.infohash,
        meta.trackers,
        meta.fingerprint,
    )
    assert set(bencode.decode(loaded.to_bytes())) == {b"anomos", b"anomos-info"}
    assert not meta.legacy and not anonymize(old, trackers=[TRACKER], fingerprint=FP).legacy


@pytest.mark.parametrize(
    "total",
    [1, 2_684_355, 2_684_356, 10_737_419, 700 * 2**20, 3 * 2**30, 50 * 2**30, 10**12, 10**15],
)
def test_auto_piece_length_matches_libtorrent(total: int):
    entry = lt.create_file_entry("x", total)
    expected = lt.create_torrent([entry], 0, flags=lt.create_torrent.v1_only).piece_length()
    assert auto_piece_length(total) == expected


def test_make_uses_auto_piece_length(tmp_path: Path):
    path = tmp_path / "f"
    write(path, 3 * 2**20, 1)
    meta = make_metainfo(path, trackers=[TRACKER], progress=False)
    assert meta.piece_length == 32768
    assert meta.infohash == lt_info(lt_make(path, 0)).info_hashes().v1.to_bytes()


# ----------------------------------------------------------------------------- round trip


def test_save_load_round_trip_is_atomic(tree: Path, tmp_path: Path):
    meta = make_metainfo(tree, trackers=[TRACKER], fingerprint=FP.upper(), progress=False)
    assert meta.fingerprint == FP
    out = tmp_path / "out" / "share.atorrent"
    out.parent.mkdir()
    meta.save(out)
    assert os.listdir(out.parent) == ["share.atorrent"]  # no temporary file left behind
    loaded = Metainfo.load(out)
    assert loaded == meta
    assert loaded.to_bytes() == out.read_bytes()
    top = bencode.decode(out.read_bytes())
    assert set(top) == {b"anomos", b"anomos-info"}
    assert top[b"anomos"] == {
        b"version": 2,
        b"trackers": [TRACKER.encode()],
        b"fingerprint": FP.encode(),
    }


def test_pieces_hash_the_concatenated_files(tree: Path):
    meta = make_metainfo(tree, trackers=[TRACKER], piece_length=16384, progress=False)
    stream = b"".join(tree.parent.joinpath(*f.path).read_bytes() for f in meta.files)
    assert len(stream) == meta.total_length
    for i, digest in enumerate(meta.pieces):
        chunk = stream[i * 16384 : (i + 1) * 16384]
        assert hashlib.sha1(chunk).digest() == digest
        assert len(chunk) == meta.piece_size(i)
    offsets = [f.offset for f in meta.files]
    assert offsets == sorted(offsets) and offsets[0] == 0


def test_symlink_inside_tree_is_followed(tmp_path: Path):
    root = tmp_path / "s"
    write(root / "real", 1000, 1)
    (root / "link").symlink_to("real")
    meta = make_metainfo(root, trackers=[TRACKER], progress=False)
    assert [(f.path[-1], f.length) for f in meta.files] == [("link", 1000), ("real", 1000)]


# ----------------------------------------------------------------------------- anonymize


def test_anonymize_keeps_infohash_and_drops_identity(tree: Path):
    plain = lt_make(
        tree,
        16384,
        trackers=["udp://tracker.opentrackr.example:1337/announce"],
        url_seeds=["http://mirror.example/share/"],
        nodes=[("router.example", 6881)],
        comment="uploaded by alice@example.org",
    )
    top = bencode.decode(plain)
    assert {b"url-list", b"nodes", b"comment", b"announce"} <= set(top)
    meta = anonymize(plain, trackers=[TRACKER], fingerprint=FP)
    data = meta.to_bytes()
    assert meta.infohash == lt_info(plain).info_hashes().v1.to_bytes()
    assert set(bencode.decode(data)) == {b"anomos", b"anomos-info"}
    for leak in (b"opentrackr", b"mirror.example", b"router.example", b"alice", b"creat"):
        assert leak not in data
    with pytest.raises(RuntimeError, match="info"):
        lt.load_torrent_buffer(data)
    atp = lt.load_torrent_buffer(unwrap(data))
    assert atp.ti.info_hashes().v1.to_bytes() == meta.infohash
    assert list(atp.url_seeds) == [] and list(atp.dht_nodes) == []
    assert Metainfo.from_bytes(data).fingerprint == FP


def test_anonymize_keeps_foreign_info_keys_verbatim():
    info = {
        b"length": 5,
        b"name": b"x",
        b"piece length": 16384,
        b"pieces": hashlib.sha1(b"hello").digest(),
        b"source": b"SOMESITE",
    }
    raw = bencode.encode({b"announce": b"http://t/", b"info": info})
    meta = anonymize(raw, trackers=[TRACKER], fingerprint=None)
    assert meta.infohash == hashlib.sha1(bencode.encode(info)).digest()
    assert meta.fingerprint is None and b"fingerprint" not in meta.to_bytes()


def test_plain_torrent_has_no_anomos_trackers(tree: Path):
    meta = Metainfo.from_bytes(lt_make(tree, 16384, trackers=["http://t.example/a"]))
    assert meta.trackers == () and not meta.is_anomos and meta.fingerprint is None


# ----------------------------------------------------------------------------- hostile metainfo


def good_info(**changes: Any) -> dict[bytes, Any]:
    info: dict[bytes, Any] = {
        b"files": [
            {b"length": 10, b"path": [b"dir", b"a"]},
            {b"length": 20, b"path": [b"b"]},
        ],
        b"name": b"root",
        b"piece length": 16384,
        b"pieces": b"\x01" * 20,
    }
    for key, value in changes.items():
        k = key.replace("_", " ").encode()
        if value is None:
            info.pop(k, None)
        else:
            info[k] = value
    return info


def atorrent(info: Any = None, **top: Any) -> bytes:
    doc: dict[bytes, Any] = {b"info": good_info() if info is None else info}
    doc.update({k.encode(): v for k, v in top.items()})
    return bencode.encode(doc)


def files(*paths: list[bytes], length: int = 10) -> list[dict[bytes, Any]]:
    return [{b"length": length, b"path": p} for p in paths]


HOSTILE: list[tuple[str, bytes, str]] = [
    ("traversal", atorrent(good_info(files=files([b"..", b"etc", b"passwd"]))), r"path\[0\]"),
    ("slash", atorrent(good_info(files=files([b"a/../../b"]))), "separator"),
    ("absolute", atorrent(good_info(files=files([b"/etc/passwd"]))), "separator"),
    ("backslash", atorrent(good_info(files=files([b"..\\..\\x"]))), "separator"),
    ("dot", atorrent(good_info(files=files([b"a", b"."]))), r"path\[1\]"),
    ("empty comp", atorrent(good_info(files=files([b""]))), "not allowed"),
    ("nul", atorrent(good_info(files=files([b"a\x00b"]))), "NUL"),
    ("empty path", atorrent(good_info(files=files([]))), "path: not a non-empty list"),
    ("name dotdot", atorrent(good_info(name=b"..")), "info.name"),
    ("name slash", atorrent(good_info(name=b"/tmp")), "info.name"),
    ("name missing", atorrent(good_info(name=None)), "info.name: not a string"),
    ("name int", atorrent(good_info(name=5)), "info.name: not a string"),
    ("name utf8", atorrent(good_info(name=b"\xff\xfe")), "UTF-8"),
    ("long comp", atorrent(good_info(files=files([b"x" * 300]))), "longer than 255"),
    ("dup", atorrent(good_info(files=files([b"a"], [b"a"]))), "appears twice"),
    ("file dir", atorrent(good_info(files=files([b"a"], [b"a", b"b"]))), "inside file a"),
    ("dir file", atorrent(good_info(files=files([b"a", b"b"], [b"a"]))), "appears twice"),
    ("pieces 19", atorrent(good_info(pieces=b"x" * 19)), "not a multiple of 20"),
    ("pieces count", atorrent(good_info(pieces=b"x" * 40)), "2 hashes"),
    ("pieces none", atorrent(good_info(pieces=None)), "info.pieces"),
    ("pieces int", atorrent(good_info(pieces=3)), "info.pieces"),
    ("piece 0", atorrent(good_info(piece_length=0)), "info.piece length"),
    ("piece neg", atorrent(good_info(piece_length=-16384)), "info.piece length"),
    ("piece odd", atorrent(good_info(piece_length=1000)), "not a multiple of 16384"),
    ("piece huge", atorrent(good_info(piece_length=2**40)), "info.piece length"),
    ("piece str", atorrent(good_info(piece_length=b"16384")), "not an integer"),
    ("length neg", atorrent(good_info(files=files([b"a"], length=-1))), r"files\[0\].length"),
    ("length huge", atorrent(good_info(files=files([b"a"], length=2**70))), "outside"),
    ("length str", atorrent(good_info(files=files([b"a"], length=b"1"))), "not an integer"),
    ("big int", b"d4:infod6:lengthi" + b"9" * 5000 + b"eee", "bencode"),
    ("files dict", atorrent(good_info(files={b"a": 1})), "info.files"),
    ("files empty", atorrent(good_info(files=[])), "info.files"),
    ("file not dict", atorrent(good_info(files=[b"a"])), r"info.files\[0\]"),
    ("path str", atorrent(good_info(files=[{b"length": 1, b"path": b"a"}])), "path"),
    ("path int", atorrent(good_info(files=files([1]))), r"path\[0\]: not a string"),
    ("both", atorrent(good_info(length=30)), "both length and files"),
    ("neither", atorrent(good_info(files=None)), "missing length or files"),
    ("v2 only", atorrent(good_info(files=None, file_tree={})), "v2-only"),
    ("empty total", atorrent(good_info(files=files([b"a"], length=0))), "total length is 0"),
    ("private str", atorrent(good_info(private=b"1")), "info.private"),
    ("no info", bencode.encode({b"announce": b"x"}), "info: missing"),
    ("info list", atorrent(info=[1]), "info: missing or not a dictionary"),
    ("top list", b"li1ee", "not a bencoded dictionary"),
    ("truncated", atorrent()[:-7], "truncated or corrupt file .bencode: stream underflow"),
    ("junk", atorrent() + b"x", "bencode"),
    ("unsorted", b"d4:infod4:name1:x6:lengthi1eee", "disordered"),
    ("anomos list", atorrent(anomos=[1]), "anomos: not a dictionary"),
    ("anomos v3", atorrent(anomos={b"version": 3, b"trackers": [b"https://t/"]}), "version"),
    (
        "v2 at info",
        atorrent(anomos={b"version": 2, b"trackers": [b"https://t/"]}),
        "version: 2 does not match the info key",
    ),
    (
        "v1 at anomos-info",
        bencode.encode(
            {b"anomos": {b"version": 1, b"trackers": [b"https://t/"]}, b"anomos-info": good_info()}
        ),
        "version: 1 does not match the anomos-info key",
    ),
    ("both infos", atorrent(**{"anomos-info": good_info()}), "both info and anomos-info"),
    ("bare anomos-info", bencode.encode({b"anomos-info": good_info()}), "without the anomos key"),
    ("anomos no trackers", atorrent(anomos={b"version": 1}), "anomos.trackers"),
    (
        "anomos http",
        atorrent(anomos={b"version": 1, b"trackers": [b"http://t/"]}),
        r"anomos.trackers\[0\].*https://",
    ),
    (
        "anomos userinfo",
        atorrent(anomos={b"version": 1, b"trackers": [b"https://u:p@t/"]}),
        "user name",
    ),
    (
        "anomos fp",
        atorrent(anomos={b"version": 1, b"trackers": [b"https://t/"], b"fingerprint": b"zz"}),
        "anomos.fingerprint",
    ),
]


@pytest.mark.parametrize("data, message", [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_metainfo_is_refused(data: bytes, message: str):
    with pytest.raises(MetainfoError, match=message) as info:
        Metainfo.from_bytes(data)
    text = str(info.value)
    assert text.startswith("metainfo: ") and "\n" not in text and len(text) < 300


def test_good_info_is_accepted():
    meta = Metainfo.from_bytes(atorrent())
    assert [f.path for f in meta.files] == [("root", "dir", "a"), ("root", "b")]
    assert [f.offset for f in meta.files] == [0, 10]


def test_oversized_and_deep_metainfo_refused(tmp_path: Path):
    huge = atorrent(good_info(comment=b"x" * (mi.MAX_METAINFO_SIZE + 1)))
    with pytest.raises(MetainfoError, match="over the limit"):
        Metainfo.from_bytes(huge)
    path = tmp_path / "huge.atorrent"
    path.write_bytes(huge)
    with pytest.raises(MetainfoError, match=r"huge.atorrent.*over the limit"):
        Metainfo.load(path)
    deep = b"d4:infod1:x" + b"l" * 100 + b"e" * 100 + b"ee"
    with pytest.raises(MetainfoError, match="nesting"):
        Metainfo.from_bytes(deep)
    with pytest.raises(MetainfoError, match=r"cannot read .*missing"):
        Metainfo.load(tmp_path / "missing")


def test_pad_files_are_marked():
    info = good_info(
        files=[
            {b"length": 10, b"path": [b"a"]},
            {b"attr": b"p", b"length": 16374, b"path": [b".pad", b"16374"]},
            {b"length": 5, b"path": [b"b"]},
        ],
        pieces=b"x" * 40,
    )
    meta = Metainfo.from_bytes(atorrent(info))
    assert [f.pad for f in meta.files] == [False, True, False]
    assert meta.files[2].offset == 16384


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_metainfo_never_crashes(data: st.DataObject):
    """Random byte flips, cuts and inserts give a Metainfo or a MetainfoError, nothing else."""
    raw = bytearray(atorrent(anomos={b"version": 1, b"trackers": [b"https://t/"]}))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "flip":
            raw[pos] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del raw[pos : pos + data.draw(st.integers(1, 8))]
        else:
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        if not raw:
            raw = bytearray(b"x")
    try:
        meta = Metainfo.from_bytes(bytes(raw))
    except MetainfoError as exc:
        assert "\n" not in str(exc)
    else:
        assert all(".." not in f.path and all(f.path) for f in meta.files)
        assert meta.total_length > 0 and meta.piece_count >= 1


# ----------------------------------------------------------------------------- making: errors


def test_make_refuses_bad_inputs(tmp_path: Path):
    empty = tmp_path / "empty"
    (empty / "only" / "dirs").mkdir(parents=True)
    with pytest.raises(StorageError, match="folder has no files"):
        make_metainfo(empty, trackers=[TRACKER], progress=False)
    zeros = tmp_path / "zeros"
    zeros.mkdir()
    (zeros / "a").write_bytes(b"")
    with pytest.raises(StorageError, match="every file is empty"):
        make_metainfo(zeros, trackers=[TRACKER], progress=False)
    with pytest.raises(StorageError, match="cannot read"):
        make_metainfo(tmp_path / "nope", trackers=[TRACKER], progress=False)


def test_make_refuses_escaping_symlinks(tmp_path: Path):
    outside = tmp_path / "secret"
    outside.write_bytes(b"private key")
    root = tmp_path / "share"
    write(root / "ok", 10, 1)
    (root / "leak").symlink_to(outside)
    with pytest.raises(StorageError, match="points outside the shared folder"):
        make_metainfo(root, trackers=[TRACKER], progress=False)
    (root / "leak").unlink()
    (root / "dangling").symlink_to(root / "missing")
    with pytest.raises(StorageError, match="dangling"):
        make_metainfo(root, trackers=[TRACKER], progress=False)
    (root / "dangling").unlink()
    (root / "sub").mkdir()
    (root / "loop").symlink_to(root / "sub")
    with pytest.raises(StorageError, match="symlinked folder"):
        make_metainfo(root, trackers=[TRACKER], progress=False)
    (root / "loop").unlink()
    os.mkfifo(root / "fifo")
    with pytest.raises(StorageError, match="not a regular file"):
        make_metainfo(root, trackers=[TRACKER], progress=False)


def test_make_reports_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    root = tmp_path / "share"
    write(root / "a", 10, 1)

    def denied(path: Path) -> Any:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(mi, "_open_file", denied)
    with pytest.raises(StorageError, match=r"cannot read .*share/a: Permission denied"):
        make_metainfo(root, trackers=[TRACKER], progress=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"trackers": []}, "at least one tracker"),
        ({"trackers": ["http://t.example/"]}, "https://"),
        ({"trackers": ["https:///nohost"]}, "no host"),
        ({"trackers": ["https://t.example/ x"]}, "spaces"),
        ({"trackers": [TRACKER], "piece_length": 3 * 16384}, "power of two"),
        ({"trackers": [TRACKER], "piece_length": 8192}, "power of two"),
        ({"trackers": [TRACKER], "piece_length": 2**27}, "power of two"),
        ({"trackers": [TRACKER], "fingerprint": "abc"}, "SHA-256"),
    ],
)
def test_make_refuses_bad_arguments(tmp_path: Path, kwargs: dict[str, Any], message: str):
    path = tmp_path / "f"
    write(path, 10, 1)
    with pytest.raises(ConfigError, match=message):
        make_metainfo(path, progress=False, **kwargs)


def test_anonymize_refuses_bad_torrent_and_arguments(tree: Path):
    with pytest.raises(MetainfoError):
        anonymize(b"not bencode", trackers=[TRACKER], fingerprint=None)
    good = lt_make(tree, 16384)
    with pytest.raises(ConfigError):
        anonymize(good, trackers=["udp://t:1/"], fingerprint=None)
    with pytest.raises(AnomosError):
        anonymize(good, trackers=[TRACKER], fingerprint="xyz")
    meta = anonymize(good, trackers=[TRACKER, TRACKER], fingerprint="AB:" * 31 + "AB")
    assert meta.trackers == (TRACKER,) and meta.fingerprint == "ab" * 32
