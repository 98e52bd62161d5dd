"""The ``nograd`` command line: ``list``, ``demo`` and ``bench`` (``merge`` is in ``test_cli.py``)."""

from __future__ import annotations

import json
import pathlib
import re
import sys

import pytest

import nograd
from nograd import cli
from nograd.patches import supported_families

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_list_prints_every_method_its_families_and_options(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    infos = nograd.methods()
    assert out.startswith(f"{len(infos)} methods")
    for name, info in infos.items():
        block = out.split(f"\n{name}: {info.summary}\n", 1)[1].split("\n\n", 1)[0]
        assert f"(arXiv {info.arxiv})" in block and f"families: {', '.join(info.families)}" in block
        for option, meta in info.options.items():
            assert f"    {option} = {meta['default']!r}: " in block
    families = out.split("model families:\n", 1)[1]
    for kind in ("text", "vlm", "dit"):
        assert f"  {kind}: {', '.join(supported_families(kind))}" in families
    assert "zerotuning" in out and "gamma = 4.0" in out


def test_list_json(capsys):
    assert cli.main(["list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert set(listed["methods"]) == set(nograd.methods())
    assert listed["methods"]["zerotuning"]["options"]["gamma"]["default"] == "4.0"
    assert listed["families"]["dit"] == supported_families("dit")


def test_demo_binds_to_localhost_and_shares_only_when_asked():
    parse = cli.build_parser().parse_args
    args = parse(["demo"])
    assert (args.host, args.port, args.share) == ("127.0.0.1", 7860, False)
    args = parse(["demo", "--share", "--host", "0.0.0.0", "--port", "8000"])
    assert (args.host, args.port, args.share) == ("0.0.0.0", 8000, True)


def test_demo_launches_the_app_with_those_options(monkeypatch, capsys):
    pytest.importorskip("gradio")
    sys.path.insert(0, str(ROOT))
    from demo import app

    launched = {}

    class Fake:
        def queue(self, **kwargs):
            return self

        def launch(self, **kwargs):
            launched.update(kwargs)

    monkeypatch.setattr(app, "build_app", Fake)
    assert cli.main(["demo", "--port", "7999"]) == 0
    assert launched["server_name"] == "127.0.0.1" and launched["server_port"] == 7999
    assert launched["share"] is False and launched["max_file_size"] == app.MAX_FILE_SIZE
    assert capsys.readouterr().err == ""  # no warning: localhost, no link
    assert cli.main(["demo", "--share", "--host", "0.0.0.0"]) == 0
    assert launched["share"] is True and launched["server_name"] == "0.0.0.0"
    err = capsys.readouterr().err
    assert "public link" in err and "other machines can reach" in err
    # python -m demo / python demo/app.py parse the same way
    assert app.launch_options(app.parse_args([]))["share"] is False
    assert app.parse_args([]).host == "127.0.0.1"


def test_demo_ports_out_of_range_and_taken_are_one_line_errors(monkeypatch, capsys):
    """A port outside 1-65535 is an argument error (exit 2, usage line), for ``nograd demo`` and ``python -m demo``
    alike (one definition); a port the launch cannot bind gives one line and exit 2, not gradio's traceback."""
    pytest.importorskip("gradio")
    sys.path.insert(0, str(ROOT))
    from demo import app

    for argv in (["demo", "--port", "99999"], ["demo", "--port", "0"], ["demo", "--port", "http"]):
        with pytest.raises(SystemExit) as done:
            cli.main(argv)
        assert done.value.code == 2 and "an int in 1-65535" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        app.parse_args(["--port", "-1"])
    assert "an int in 1-65535" in capsys.readouterr().err

    class Taken:
        def queue(self, **kwargs):
            return self

        def launch(self, **kwargs):
            raise OSError(f"Cannot find empty port in range: {kwargs['server_port']}-{kwargs['server_port']}")

    monkeypatch.setattr(app, "build_app", Taken)
    assert cli.main(["demo", "--port", "7999"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "nograd demo: error: cannot serve on 127.0.0.1:7999: Cannot find empty port in range: 7999-7999"


def test_bench_lists_the_benchmarks(capsys):
    assert cli.main(["bench"]) == 0
    out = capsys.readouterr().out
    for script in (ROOT / "bench").glob("*.py"):
        assert f"  {script.stem}: " in out


def test_bench_runs_the_script_with_its_arguments(tmp_path, monkeypatch, capsys):
    script = tmp_path / "echo.py"
    script.write_text('"""Echo."""\nimport sys\nprint("ARGS", sys.argv[1:])\n'
                      'sys.exit(3 if "--fail" in sys.argv else 0)\n')
    monkeypatch.setattr(cli, "benchmarks", lambda: {"echo": script})
    assert cli.main(["bench", "echo", "--n", "4", "--flag"]) == 0
    assert "ARGS ['--n', '4', '--flag']" in capsys.readouterr().out
    assert cli.main(["bench", "echo", "--fail"]) == 3
    assert cli.main(["bench", "nope"]) == 2
    assert "no benchmark 'nope'; available: echo" in capsys.readouterr().err


def test_demo_without_gradio_prints_the_methods(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    assert cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    assert 'pip install -e ".[demo]"' in out and all(f"\n{name}: " in out for name in nograd.methods())


def test_console_script_and_extras():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'nograd = "nograd.cli:main"' in text
    assert re.search(r'^demo = \[[^\]]*"gradio', text, re.M) and re.search(r'^test = \[[^\]]*"gradio', text, re.M)
