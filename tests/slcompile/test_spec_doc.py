"""The spec in the repository stays in step with the code, and every link a user follows resolves
inside the repository."""

import dataclasses
import os
import re
import subprocess
import sys

from slcompile import SuperlinearConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCS = ["README.md", *(os.path.join("docs", f) for f in sorted(os.listdir(os.path.join(ROOT, "docs")))
                       if f.endswith(".md")), os.path.join("benchmarks", "RESULTS.md")]


def _spec_table():
    text = open(os.path.join(ROOT, "docs", "spec.md"), encoding="utf-8").read()
    section = text.split("## Parameters")[1].split("\n## ")[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        m = re.match(r"`(\w+)`", cells[0]) if len(cells) == 3 else None
        if m:
            rows[m.group(1)] = (cells[1], cells[2])
    return rows


def test_spec_table_lists_every_config_field_with_its_default():
    rows = _spec_table()
    fields = {f.name: f.default for f in dataclasses.fields(SuperlinearConfig)}
    assert set(rows) == set(fields), (set(rows) ^ set(fields))
    default_config = SuperlinearConfig()
    stripe = SuperlinearConfig(search_key="anchor")
    for name, default in fields.items():
        cell = rows[name][1]
        written = cell.split(":")[0].strip().strip("`") if default is None else cell.strip("`")
        if default is None and name != "scale":  # resolved by the search kind: both named
            assert re.search(rf"\b{default_config.to_dict()[name]}\b", cell), (name, cell)
            if name != "search_key":
                assert re.search(rf"\b{stripe.to_dict()[name]}\b.*stripe", cell), (name, cell)
        if isinstance(default, bool):
            assert written == str(default), (name, written, default)
        elif isinstance(default, str):
            assert written == f'"{default}"', (name, written, default)
        elif default is None:
            assert written == "None", (name, written)
        else:
            assert float(written) == float(default), (name, written, default)


def test_spec_lists_every_search_key():
    from slcompile.kernels.config import SEARCH_KEYS
    meaning = _spec_table()["search_key"][0]
    for key in SEARCH_KEYS:
        assert f'"{key}"' in meaning, key


def _links(path):
    text = open(os.path.join(ROOT, path), encoding="utf-8").read()
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_every_relative_link_resolves_inside_the_repository():
    root = os.path.realpath(ROOT)
    checked = 0
    for doc in DOCS:
        for link in _links(doc):
            if re.match(r"[a-z]+:", link) or link.startswith("#"):
                continue
            target = os.path.realpath(os.path.join(ROOT, os.path.dirname(doc), link.split("#")[0]))
            assert target.startswith(root + os.sep), f"{doc}: {link} leaves the repository"
            assert os.path.exists(target), f"{doc}: {link} does not exist"
            checked += 1
    assert checked >= 4


def test_help_names_only_files_of_the_repository():
    out = ""
    for cmd in ([], ["demo"], ["convert"], ["inspect"], ["check"], ["bench"], ["export"],
                ["calibrate"]):
        r = subprocess.run([sys.executable, "-m", "slcompile", *cmd, "--help"], capture_output=True,
                           text=True, timeout=300, env={**os.environ, "COLUMNS": "400"})
        assert r.returncode == 0, r.stderr
        out += r.stdout
    named = set(re.findall(r"[\w./-]*\w\.md\b", out))
    assert "docs/spec.md" in named
    for name in named:
        assert not name.startswith(".."), name
        assert os.path.exists(os.path.join(ROOT, name)), f"--help names {name}, not in the repository"
