"""Every MAC, tag, commitment and signature check is constant-time: no ``==``/``!=`` on them in src.

A static check over the source (AST): a comparison with ``==``/``!=`` whose operand names a tag,
MAC, signature or commitment is a finding, except the audit chain's public hashes (allow-listed:
they are not secrets and an attacker gains nothing from timing them).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "kmsenv"
_SENSITIVE = re.compile(r"(^|_)(tag|mac|signature|commitment|committed|expected_sig)(_|$)|hmac", re.IGNORECASE)
#: (file, source text of the comparison) allowed to use ==/!=, with the reason.
_ALLOWED = {
    ("server/audit.py", "_digest(record) != claimed"),  # public SHA-256 chain, not a secret
}


def _names(node: ast.AST) -> list[str]:
    out = []
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            out.append(sub.id)
        elif isinstance(sub, ast.Attribute):
            out.append(sub.attr)
        elif isinstance(sub, ast.Call) and isinstance(sub.func, ast.Name | ast.Attribute):
            out.append(sub.func.id if isinstance(sub.func, ast.Name) else sub.func.attr)
    return out


def _is_size_or_literal(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, ast.Name) and node.id.isupper():
        return True  # TAG_SIZE, CHUNK_TAG_SIZE, ...
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "len"


def test_no_variable_time_comparison_of_macs_tags_or_signatures() -> None:
    findings = []
    for path in SRC.rglob("*.py"):
        source = path.read_text("utf-8")
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, ast.Compare) or not any(isinstance(op, ast.Eq | ast.NotEq) for op in node.ops):
                continue
            operands = [node.left, *node.comparators]
            if any(_is_size_or_literal(o) for o in operands):
                continue  # against a literal, a size constant or a length: nothing secret
            names = [n for o in operands for n in _names(o)]
            if any(_SENSITIVE.search(n) for n in names):
                where = str(path.relative_to(SRC))
                text = ast.get_source_segment(source, node) or ""
                if (where, text) not in _ALLOWED:
                    findings.append(f"{where}:{node.lineno}: {text}")
    assert not findings, findings


def test_the_check_sees_a_plain_comparison(tmp_path: Path) -> None:
    tree = ast.parse("ok = computed_tag == header.tag")
    compare = next(n for n in ast.walk(tree) if isinstance(n, ast.Compare))
    assert any(_SENSITIVE.search(n) for n in _names(compare))
