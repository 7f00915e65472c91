import hashlib
import io
import json
import tarfile
import threading
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.errors import UserError
from sam_data.download import DownloadConfig, download, download_file, verify_tar
from sam_data.links import parse_links, parse_md5

SA1B = Path(__file__).parent.parent / "data" / "sa1b"


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.fixture
def sa_tars(tmp_path, sa_members, make_tar) -> dict[str, bytes]:
    """Three real SA-1B-format tars (real photos + annotation jsons), by file name."""
    out = {}
    for n, ids in enumerate([[1, 2], [3, 4, 5], [6]]):
        path = make_tar(tmp_path / f"src_{n}.tar", sa_members(ids))
        out[f"sa_00000{n}.tar"] = path.read_bytes()
    return out


def write_links(path, rows: list[tuple[str, str]]) -> str:
    """A links file in the real layout: header, rows as given (not sorted), no final newline."""
    path.write_text("\n".join(["file_name\tcdn_link", *(f"{n}\t{u}" for n, u in rows)]))
    return str(path)


def serve(file_server, tars: dict[str, bytes], **behaviour) -> list[tuple[str, str]]:
    rows = [
        (name, file_server.add(name, data, **behaviour.get(name, {})))
        for name, data in tars.items()
    ]
    rows.reverse()  # the real file is not in numeric order either
    rows.insert(1, ("sa_images_ids.txt", file_server.add("sa_images_ids.txt", b"1\n2\n")))
    return rows


def test_parse_real_links_and_md5_files():
    links = parse_links(str(SA1B / "sa1b_links_full.txt"))
    assert len(links.tars) == 1000
    assert list(links.tars) == sorted(links.tars)  # the file is not sorted, the result is
    assert links.ignored == ["sa_images_ids.txt", "sa_co_gold.tar"]
    assert all(u.startswith("https://") for u in links.tars.values())
    md5s = parse_md5(str(SA1B / "sa1b_md5_checklist.txt"))
    assert set(md5s) == set(links.tars)
    assert md5s["sa_000000.tar"] == "78d0f487c735a3de86ae6e1b0ff24ea9"
    assert list(links.select(["sa_000999", "sa_000020.tar"])) == ["sa_000020.tar", "sa_000999.tar"]
    with pytest.raises(UserError, match="'sa_001000' is not an image tar"):
        links.select(["sa_001000"])


def test_download_resumes_after_cut_and_md5_matches(tmp_path, file_server, sa_tars, capsys):
    rows = serve(file_server, sa_tars, **{"sa_000001.tar": {"cut_first": True}})
    links = write_links(tmp_path / "links.txt", rows)
    (tmp_path / "md5.txt").write_text("".join(f"{md5(d)}  {n}\n" for n, d in sa_tars.items()))
    out = tmp_path / "sa1b"
    args = [
        "sam",
        "download",
        links,
        "--out",
        str(out),
        "--md5",
        str(tmp_path / "md5.txt"),
        "--no-progress",
    ]
    assert main([*args, "--workers", "2"]) == 0
    for name, data in sa_tars.items():
        assert md5((out / name).read_bytes()) == md5(data)
        assert json.loads((out / f".{name}.verified").read_text())["md5"] == md5(data)
    cut = file_server.requests_for("sa_000001.tar")
    half = len(sa_tars["sa_000001.tar"]) // 2
    assert cut == [("sa_000001.tar", None, 200), ("sa_000001.tar", f"bytes={half}-", 206)]
    assert not list(out.glob("*.part"))
    assert file_server.requests_for("sa_images_ids.txt") == []  # non-tar rows are never fetched
    text = capsys.readouterr().out
    assert (
        "3 downloaded" in text
        and "ignored non-image rows of the links file: sa_images_ids.txt" in text
    )

    # A second run skips every verified file without a single request.
    file_server.log.clear()
    assert main(args) == 0
    assert file_server.log == []
    assert "0 downloaded" in capsys.readouterr().out


def test_only_selects_and_resumes_a_part_left_by_an_earlier_run(tmp_path, file_server, sa_tars):
    rows = serve(file_server, sa_tars)
    links = write_links(tmp_path / "links.txt", rows)
    out = tmp_path / "sa1b"
    out.mkdir()
    data = sa_tars["sa_000002.tar"]
    (out / "sa_000002.tar.part").write_bytes(data[:1000])  # an interrupted earlier run
    s = download(links, str(out), only=["sa_000002"], progress=False)
    assert [(r.name, r.status) for r in s.results] == [("sa_000002.tar", "downloaded")]
    assert s.not_selected == 2 and "tar read to the end" in s.results[0].detail
    assert [r[0] for r in file_server.log] == ["sa_000002.tar"]
    assert file_server.log[0][1:] == ("bytes=1000-", 206)
    assert (out / "sa_000002.tar").read_bytes() == data
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["sa_000002.tar"]


def test_server_ignoring_range_restarts_from_zero(tmp_path, file_server, sa_tars):
    name = "sa_000001.tar"
    rows = serve(
        file_server, {name: sa_tars[name]}, **{name: {"cut_first": True, "ignore_range": True}}
    )
    s = download(write_links(tmp_path / "l.txt", rows), str(tmp_path / "o"), progress=False)
    assert s.results[0].status == "downloaded" and s.results[0].md5 == md5(sa_tars[name])
    assert [r[2] for r in file_server.requests_for(name)] == [200, 200]


def test_md5_mismatch_deletes_the_file_and_reports_it(tmp_path, file_server, sa_tars, capsys):
    rows = serve(file_server, sa_tars)
    links = write_links(tmp_path / "links.txt", rows)
    (tmp_path / "md5.txt").write_text(
        f"{'0' * 32}  sa_000000.tar\n{md5(sa_tars['sa_000001.tar'])}  sa_000001.tar"
    )
    out = tmp_path / "o"
    rc = main(
        [
            "sam",
            "download",
            links,
            "--out",
            str(out),
            "--only",
            "sa_000000,sa_000001",
            "--md5",
            str(tmp_path / "md5.txt"),
            "--no-progress",
        ]
    )
    assert rc == 1
    text = capsys.readouterr().out
    assert "FAILED sa_000000.tar: md5 mismatch: expected 0000" in text and "deleted" in text
    assert not (out / "sa_000000.tar").exists() and not (out / "sa_000000.tar.part").exists()
    assert (out / "sa_000001.tar").exists()


def test_without_md5_a_tar_cut_between_members_is_rejected(
    tmp_path, file_server, sa_tars, sa_members, make_tar
):
    whole = make_tar(tmp_path / "w.tar", sa_members([7, 8])).read_bytes()
    with tarfile.open(tmp_path / "w.tar") as tar:
        second = tar.getmembers()[2]  # sa_8.jpg: cut just before its header
    cut = whole[: second.offset]
    rows = serve(file_server, {"sa_000009.tar": cut})
    s = download(write_links(tmp_path / "l.txt", rows), str(tmp_path / "o"), progress=False)
    assert s.results[0].status == "failed"
    assert "no end-of-archive marker" in s.results[0].detail
    assert not (tmp_path / "o" / "sa_000009.tar").exists()
    assert verify_tar(str(tmp_path / "w.tar")) == 4


def test_an_existing_file_without_marker_is_verified_then_skipped(tmp_path, file_server, sa_tars):
    rows = serve(file_server, sa_tars)
    out = tmp_path / "o"
    out.mkdir()
    (out / "sa_000000.tar").write_bytes(sa_tars["sa_000000.tar"])  # e.g. fetched with wget
    with tarfile.open(fileobj=io.BytesIO(sa_tars["sa_000001.tar"])) as tar:
        last = tar.getmembers()[-1]
    cut = last.offset_data + last.size // 2
    (out / "sa_000001.tar").write_bytes(sa_tars["sa_000001.tar"][:cut])  # copy cut inside a member
    s = download(
        write_links(tmp_path / "l.txt", rows),
        str(out),
        only=["sa_000000", "sa_000001"],
        progress=False,
    )
    assert [(r.name, r.status) for r in s.results] == [
        ("sa_000000.tar", "skipped"),
        ("sa_000001.tar", "downloaded"),
    ]
    assert [r[0] for r in file_server.log] == ["sa_000001.tar"]
    assert (out / "sa_000001.tar").read_bytes() == sa_tars["sa_000001.tar"]


def test_expired_link_fails_at_once_and_errors_retry_a_bounded_number_of_times(
    tmp_path, file_server, sa_tars
):
    rows = serve(
        file_server, sa_tars, **{"sa_000000.tar": {"status": 403}, "sa_000001.tar": {"status": 503}}
    )
    s = download(
        write_links(tmp_path / "l.txt", rows),
        str(tmp_path / "o"),
        only=["sa_000000", "sa_000001"],
        retries=2,
        backoff=0,
        workers=1,
        progress=False,
    )
    by_name = {r.name: r for r in s.results}
    assert (
        "HTTP 403" in by_name["sa_000000.tar"].detail
        and "links expire" in by_name["sa_000000.tar"].detail
    )
    assert len(file_server.requests_for("sa_000000.tar")) == 1
    assert "HTTP 503" in by_name["sa_000001.tar"].detail
    assert len(file_server.requests_for("sa_000001.tar")) == 3
    assert any(line.startswith("  FAILED sa_000001.tar") for line in s.lines())


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such links file"),
        ("name\turl\nsa_000000.tar\thttps://x/a.tar", "not an SA-1B links file"),
        (
            "file_name\tcdn_link\nsa_000000.tar https://x/a.tar",
            "line 2: expected 'file_name<TAB>http",
        ),
        ("file_name\tcdn_link\nsa_images_ids.txt\thttps://x/a.txt", "lists no image tars"),
    ],
)
def test_bad_links_file_is_a_one_line_error(tmp_path, capsys, content, message):
    links = tmp_path / "links.txt"
    if content is not None:
        links.write_text(content)
    assert main(["sam", "download", str(links), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err


def test_bad_md5_file_and_bad_only_are_one_line_errors(tmp_path, capsys):
    links = write_links(tmp_path / "l.txt", [("sa_000000.tar", "http://127.0.0.1:9/a.tar")])
    (tmp_path / "md5.txt").write_text("not-an-md5 sa_000000.tar\n")
    assert (
        main(
            [
                "sam",
                "download",
                links,
                "--out",
                str(tmp_path / "o"),
                "--md5",
                str(tmp_path / "md5.txt"),
            ]
        )
        == 2
    )
    assert "md5.txt line 1: expected '<md5>  <file name>'" in capsys.readouterr().err
    assert (
        main(["sam", "download", links, "--out", str(tmp_path / "o"), "--only", "sa_000005"]) == 2
    )
    assert "'sa_000005' is not an image tar" in capsys.readouterr().err


def test_an_interrupted_transfer_keeps_its_part_file(tmp_path, file_server, sa_tars):
    data = sa_tars["sa_000000.tar"]
    url = file_server.add("sa_000000.tar", data)
    (tmp_path / "sa_000000.tar.part").write_bytes(data[:1000])
    stop = threading.Event()
    stop.set()  # as after Ctrl-C
    r = download_file("sa_000000.tar", url, DownloadConfig(out=str(tmp_path)), stop=stop)
    assert r.status == "failed" and r.detail.startswith("interrupted")
    assert (tmp_path / "sa_000000.tar.part").read_bytes() == data[:1000]
    assert not (tmp_path / "sa_000000.tar").exists()
