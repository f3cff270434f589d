"""The shardcache CLI without a network: locate, plan (with key files and plots), and usage errors."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from shardcache import Ring
from shardcache.cli import main

SERVERS = "10.0.0.1:11211,10.0.0.2:11211,10.0.0.3:11211:2"
NODES = ["10.0.0.1:11211", "10.0.0.2:11211", "10.0.0.3:11211"]


@pytest.fixture(autouse=True)
def _no_servers_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHARDCACHE_SERVERS", raising=False)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code, out, err = run(capsys, "--json", *argv)
    assert code == 0, err
    assert err == ""
    return json.loads(out)


# -- locate -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("hashing", ["mmh3", "ketama"])
def test_locate_json_gives_owner_and_failover_order_from_the_ring(
    capsys: pytest.CaptureFixture[str], hashing: str
) -> None:
    keys = ["books/321", "stores/near/42", "hit_count", "ünïcode"]
    doc = run_json(capsys, "--servers", SERVERS, "--hashing", hashing, "locate", *keys)
    ring = Ring(SERVERS, hashing=hashing)
    assert doc["hashing"] == hashing
    assert doc["nodes"] == NODES
    assert [row["key"] for row in doc["keys"]] == keys
    for row in doc["keys"]:
        assert row["node"] == ring.node_for(row["key"])
        assert row["preference_list"] == list(ring.preference_list(row["key"], 3))
        assert sorted(row["preference_list"]) == NODES


def test_locate_human_table_names_each_keys_owner(capsys: pytest.CaptureFixture[str]) -> None:
    ring = Ring(SERVERS)
    code, out, err = run(capsys, "--servers", SERVERS, "locate", "books/321", "books/322")
    assert (code, err) == (0, "")
    for key in ("books/321", "books/322"):
        line = next(line for line in out.splitlines() if key in line)
        owner, *failover = ring.preference_list(key, 3)
        assert line.index(owner) < line.index(failover[0]) < line.index(failover[1])


def test_options_may_follow_the_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    after = run_json(capsys, "locate", "--servers", SERVERS, "--hashing", "ketama", "k")
    before = run_json(capsys, "--servers", SERVERS, "--hashing", "ketama", "locate", "k")
    assert after == before
    assert after["hashing"] == "ketama"


def test_servers_come_from_the_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHARDCACHE_SERVERS", "a:11211;b:11212")
    doc = run_json(capsys, "locate", "k")
    assert doc["nodes"] == ["a:11211", "b:11212"]
    doc = run_json(capsys, "--servers", "c:1", "locate", "k")  # the option wins
    assert doc["nodes"] == ["c:1"]


def test_ketama_naming_changes_placement_like_the_ring(capsys: pytest.CaptureFixture[str]) -> None:
    keys = [f"k{i}" for i in range(50)]
    servers = "a:11211,b:11211,c:11211"
    doc = run_json(
        capsys, "--servers", servers, "--hashing", "ketama", "--ketama-naming", "libketama", "locate", *keys
    )
    ring = Ring(servers, hashing="ketama", ketama_naming="libketama")
    assert [row["node"] for row in doc["keys"]] == [ring.node_for(k) for k in keys]


# -- plan -------------------------------------------------------------------------------------------


def test_plan_json_matches_ring_share_and_diff(capsys: pytest.CaptureFixture[str]) -> None:
    doc = run_json(
        capsys,
        "--servers",
        SERVERS,
        "plan",
        "--add",
        "10.0.0.4:11211",
        "--remove",
        "10.0.0.1:11211",
        "--weight",
        "10.0.0.2:11211=3",
    )
    before = Ring(SERVERS)
    after = before.without_node("10.0.0.1:11211").with_node("10.0.0.4:11211").with_weight("10.0.0.2:11211", 3)
    expected = before.diff(after)
    assert doc["before"] == NODES
    assert doc["after"] == list(after.nodes)
    assert doc["moved_fraction"] == pytest.approx(expected.moved)
    assert {(f["from"], f["to"]): f["fraction"] for f in doc["flows"]} == pytest.approx(dict(expected.flows))
    assert [f["fraction"] for f in doc["flows"]] == sorted(
        (f["fraction"] for f in doc["flows"]), reverse=True
    )
    nodes = doc["nodes"]
    assert list(nodes) == [*NODES, "10.0.0.4:11211"]
    assert {n: row["status"] for n, row in nodes.items()} == {
        "10.0.0.1:11211": "removed",
        "10.0.0.2:11211": "reweighted",
        "10.0.0.3:11211": "unchanged",
        "10.0.0.4:11211": "added",
    }
    assert nodes["10.0.0.2:11211"]["weight_before"] == 1
    assert nodes["10.0.0.2:11211"]["weight_after"] == 3
    assert nodes["10.0.0.1:11211"]["weight_after"] is None
    assert nodes["10.0.0.4:11211"]["weight_before"] is None
    for node, share in before.share().items():
        assert nodes[node]["share_before"] == pytest.approx(share)
    for node, share in after.share().items():
        assert nodes[node]["share_after"] == pytest.approx(share)
    assert nodes["10.0.0.1:11211"]["share_after"] == 0.0
    assert nodes["10.0.0.4:11211"]["share_before"] == 0.0
    assert sum(row["share_after"] for row in nodes.values()) == pytest.approx(1.0)
    assert doc["keys"] is None
    assert all(row["keys_before"] is None and row["keys_after"] is None for row in nodes.values())


def test_plan_adding_one_node_moves_keys_only_onto_it(capsys: pytest.CaptureFixture[str]) -> None:
    doc = run_json(capsys, "--servers", "a:11211,b:11211,c:11211", "plan", "--add", "d:11211")
    assert {f["to"] for f in doc["flows"]} == {"d:11211"}
    assert doc["moved_fraction"] == pytest.approx(doc["nodes"]["d:11211"]["share_after"])
    assert 0.2 < doc["moved_fraction"] < 0.3


def test_plan_accepts_ids_without_the_default_port(capsys: pytest.CaptureFixture[str]) -> None:
    doc = run_json(capsys, "--servers", "a,b,c", "plan", "--remove", "b", "--weight", "c=2")
    assert doc["after"] == ["a:11211", "c:11211"]
    assert doc["nodes"]["c:11211"]["weight_after"] == 2


def test_plan_with_no_change_moves_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    doc = run_json(capsys, "--servers", SERVERS, "plan")
    assert doc["moved_fraction"] == 0.0
    assert doc["flows"] == []


def test_plan_counts_the_keys_of_a_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    keys = [f"books/{i}" for i in range(3000)]
    path = tmp_path / "keys.txt"
    path.write_text("\n".join(keys[:1500]) + "\n\n  \r\n" + "\r\n".join(keys[1500:]) + "\n")
    doc = run_json(capsys, "--servers", SERVERS, "plan", "--add", "10.0.0.4:11211", "--keys", str(path))
    before = Ring(SERVERS)
    after = before.with_node("10.0.0.4:11211")
    expected = before.diff(after, keys)
    report = doc["keys"]
    assert report["file"] == str(path)
    assert report["total"] == expected.keys_counted == 3000
    moved = sum(before.node_for(k) != after.node_for(k) for k in keys)
    assert report["moved"] == moved
    assert report["moved_fraction"] == pytest.approx(expected.moved)
    real_flows = Counter((before.node_for(k), after.node_for(k)) for k in keys)
    assert {(f["from"], f["to"]): f["keys"] for f in report["flows"]} == {
        pair: n for pair, n in real_flows.items() if pair[0] != pair[1]
    }
    counts_before = Counter(map(before.node_for, keys))
    counts_after = Counter(map(after.node_for, keys))
    for node, row in doc["nodes"].items():
        assert row["keys_before"] == counts_before[node]
        assert row["keys_after"] == counts_after[node]


def test_plan_human_output_names_nodes_and_counts(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "keys.txt"
    path.write_text("".join(f"user:{i}\n" for i in range(400)))
    code, out, err = run(
        capsys,
        "--servers",
        SERVERS,
        "plan",
        "--add",
        "10.0.0.9:11300",
        "--remove",
        "10.0.0.2",
        "--keys",
        str(path),
    )
    assert (code, err) == (0, "")
    for node in (*NODES, "10.0.0.9:11300"):
        assert node in out
    assert "added" in out and "removed" in out
    before = Ring(SERVERS)
    after = before.without_node("10.0.0.2:11211").with_node("10.0.0.9:11300")
    assert f"{before.diff(after).moved * 100:.2f}%" in out
    moved = sum(before.node_for(f"user:{i}") != after.node_for(f"user:{i}") for i in range(400))
    assert f"that move: {moved} of 400" in out


def test_plan_reads_keys_from_stdin(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"a\nb\n\nc\n")))
    doc = run_json(capsys, "--servers", SERVERS, "plan", "--add", "z:1", "--keys", "-")
    assert doc["keys"]["total"] == 3


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    ihdr = data[16 : 16 + length]
    assert zlib.crc32(b"IHDR" + ihdr) == struct.unpack(">I", data[16 + length : 20 + length])[0]
    width, height = struct.unpack(">II", ihdr[:8])
    return width, height


def test_plan_plot_writes_a_png_chart(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "plan.png"
    doc = run_json(capsys, "--servers", SERVERS, "plan", "--add", "10.0.0.4:11211", "--plot", str(path))
    assert doc["plot"] == str(path)
    data = path.read_bytes()
    width, height = _png_size(data)
    assert width >= 600 and height >= 400
    assert b"matplotlib" in data  # its "Software" text chunk: matplotlib drew it
    assert data.endswith(b"IEND\xaeB`\x82")


def test_plot_without_matplotlib_exits_2_with_the_install_hint(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    path = tmp_path / "plan.png"
    code, out, err = run(capsys, "--servers", SERVERS, "plan", "--add", "x:1", "--plot", str(path))
    assert code == 2
    assert out == ""
    assert "pip install 'shardcache[plot]'" in err
    assert not path.exists()


# -- without the 'cli' extra (rich) -----------------------------------------------------------------

_RICH_MODULES = ("rich", "rich.console", "rich.table", "rich.text")


@pytest.mark.parametrize(
    "command",
    [["locate", "books/321"], ["--json", "locate", "books/321"], ["plan", "--add", "x:1"], ["ping"]],
)
def test_without_rich_every_command_exits_2_naming_the_cli_extra(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    for module in _RICH_MODULES:
        monkeypatch.setitem(sys.modules, module, None)  # makes importing it raise ImportError
    code, out, err = run(capsys, "--servers", SERVERS, *command)
    assert code == 2
    assert out == ""
    assert err == "shardcache: error: the shardcache command needs rich: pip install 'shardcache[cli]'\n"


def test_cli_imports_and_shows_help_without_rich() -> None:
    script = (
        "import sys\n"
        f"sys.modules.update(dict.fromkeys({_RICH_MODULES!r}))\n"
        "from shardcache.cli import main\n"
        "code = main(['--help'])\n"
        "assert not any(sys.modules.get(m) for m in sys.modules if m.split('.')[0] == 'rich')\n"
        "sys.exit(code)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: shardcache")


def test_importing_the_cli_does_not_import_rich() -> None:
    script = "import sys, shardcache.cli; print(sorted(m for m in sys.modules if m.split('.')[0] == 'rich'))"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.strip() == "[]"


# -- usage errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--servers", "a:11211,b:notaport", "locate", "k"], "b:notaport"),
        (["--servers", "a:11211,[::1", "locate", "k"], "[::1"),
        (["--servers", "a:11211,a:11211", "locate", "k"], "a:11211"),
        (["--servers", SERVERS, "plan", "--add", "c:99999"], "c:99999"),
        (["--servers", SERVERS, "plan", "--add", "10.0.0.1:11211"], "10.0.0.1:11211"),
        (["--servers", SERVERS, "plan", "--remove", "10.9.9.9:11211"], "10.9.9.9:11211"),
        (["--servers", "a:1", "plan", "--remove", "a:1"], "a:1"),
        (["--servers", SERVERS, "plan", "--weight", "10.0.0.1:11211=0"], "10.0.0.1:11211=0"),
        (["--servers", SERVERS, "plan", "--weight", "10.0.0.1:11211"], "10.0.0.1:11211"),
        (["--servers", SERVERS, "plan", "--weight", "nope:1=2"], "nope:1=2"),
        (["--servers", SERVERS, "plan", "--keys", "/no/such/keys.txt"], "/no/such/keys.txt"),
        (["--servers", SERVERS, "--timeout", "-1", "stats"], "-1"),
        (["--servers", SERVERS, "--hashing", "crc32", "locate", "k"], "crc32"),
    ],
)
def test_bad_values_exit_2_naming_the_value(
    capsys: pytest.CaptureFixture[str], argv: list[str], named: str
) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert named in err


@pytest.mark.parametrize(
    "weight",
    ["1000000000", "1001", "0", "9" * 5000, "-1", "1.5", "\u00b2", "\u0661"],
    ids=["1e9", "1001", "0", "5000-digits", "negative", "float", "superscript-2", "arabic-indic-1"],
)
def test_a_weight_outside_1_to_1000_exits_2_naming_the_range(
    capsys: pytest.CaptureFixture[str], weight: str
) -> None:
    # Thousands of digits too: int() of them raises ValueError, which must not escape as a traceback.
    item = f"10.0.0.1:11211={weight}"
    code, out, err = run(capsys, "--servers", SERVERS, "plan", "--weight", item)
    assert (code, out) == (2, "")
    assert err == f"shardcache: error: --weight {item!r}: expected ID=W with W an integer in 1..1000\n"


def test_the_largest_weight_is_accepted(capsys: pytest.CaptureFixture[str]) -> None:
    doc = run_json(capsys, "--servers", SERVERS, "plan", "--weight", "10.0.0.1:11211=1000")
    assert doc["nodes"]["10.0.0.1:11211"]["weight_after"] == 1000


@pytest.mark.parametrize(
    "change", [["--weight", "10.0.0.1:11211=2"], ["--add", "10.0.0.4:11211"]], ids=["weight", "add"]
)
def test_a_change_over_the_rings_total_weight_exits_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, change: list[str]
) -> None:
    import shardcache.ring as ring_module

    # A bound of total weight 4 (SERVERS' own) instead of 4096, so the rings are cheap to build.
    monkeypatch.setattr(ring_module, "MAX_RING_POINTS", 4 * ring_module.POINTS_PER_WEIGHT)
    code, out, err = run(capsys, "--servers", SERVERS, "plan", *change)
    assert (code, out) == (2, "")
    assert err.startswith(f"shardcache: error: {change[0]} {change[1]!r}: ")
    assert "total weight 5 (at most 4)" in err and "MAX_RING_POINTS" in err
    assert "Traceback" not in err


def test_plot_to_an_unwritable_path_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    target = str(tmp_path / "missing-dir" / "plan.png")
    code, out, err = run(capsys, "--servers", SERVERS, "plan", "--plot", target)
    assert (code, out) == (2, "")
    assert target in err


@pytest.mark.parametrize("command", [["locate", "k"], ["plan"], ["stats"], ["ping"]])
def test_missing_servers_exit_2(capsys: pytest.CaptureFixture[str], command: list[str]) -> None:
    code, out, err = run(capsys, *command)
    assert code == 2
    assert out == ""
    assert "--servers" in err and "SHARDCACHE_SERVERS" in err


def test_blank_servers_variable_is_missing_servers(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHARDCACHE_SERVERS", "  ")
    code, _, err = run(capsys, "locate", "k")
    assert code == 2 and "SHARDCACHE_SERVERS" in err


def test_no_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "--servers", SERVERS)
    assert code == 2 and "usage:" in err


def test_python_dash_m_help_lists_the_subcommands() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "shardcache", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: shardcache")
    for command in ("locate", "plan", "stats", "ping", "--servers", "--json", "--timeout"):
        assert command in result.stdout


def test_subcommand_help_returns_0(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "plan", "--help")
    assert code == 0
    assert "--add" in out and "--plot" in out


def test_human_output_shows_brackets_literally(capsys: pytest.CaptureFixture[str]) -> None:
    servers = "[::1]:11211,[2001:db8::7]:11300"
    code, out, err = run(capsys, "--servers", servers, "locate", "[bold]x", "a[/]b")
    assert (code, err) == (0, "")
    for text in ("[::1]:11211", "[2001:db8::7]:11300", "[bold]x", "a[/]b"):
        assert text in out


def test_locate_takes_keys_that_are_not_utf8() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "shardcache", "--servers", SERVERS, "--json", "locate", b"x\xff", "é"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["keys"]
    ring = Ring(SERVERS)
    assert rows[0] == {
        "key": "x\\xff",
        "node": ring.node_for(b"x\xff"),
        "preference_list": list(ring.preference_list(b"x\xff", 3)),
    }
    assert rows[1]["node"] == ring.node_for("é") == ring.node_for("é".encode())


# -- rebalance --------------------------------------------------------------------------------------


def test_rebalance_refuses_to_touch_every_key_unless_told(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--servers", SERVERS, "rebalance")
    assert code == 2 and out == ""
    assert "--key-prefix" in err and "--all-keys" in err


@pytest.mark.parametrize("rate", ["0", "-5", "inf", "fast"])
def test_rebalance_refuses_a_bad_rate(capsys: pytest.CaptureFixture[str], rate: str) -> None:
    code, _, err = run(capsys, "--servers", SERVERS, "rebalance", "--key-prefix", "p:", "--keys-per-s", rate)
    assert code == 2 and "keys per second" in err
