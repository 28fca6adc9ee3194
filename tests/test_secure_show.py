"""%secure_show re-emits only passive content unless a trusted signer vouches for the blob."""

from __future__ import annotations

import base64

import pytest

from kprivacy_nb.crypto import keys, signing, trust
from kprivacy_nb.crypto.bundle import encrypt_outputs
from kprivacy_nb.magics import export as export_magics
from kprivacy_nb.quiet.safe_mime import plain_text, safe_output

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(20)).decode()
HOSTILE = [
    {
        "output_type": "display_data",
        "data": {
            "text/html": "<img src=x onerror=alert(1)>",
            "application/javascript": "alert(2)",
            "text/plain": "a table",
        },
        "metadata": {},
    },
    {
        "output_type": "display_data",
        "data": {"image/svg+xml": "<svg><script>alert(3)</script></svg>"},
        "metadata": {},
    },
    {"output_type": "display_data", "data": {"text/markdown": "<b onclick=x>hi</b>"}},
    {"output_type": "display_data", "data": {"text/markdown": "**fine**", "image/png": PNG}},
    {"output_type": "display_data", "data": {"image/png": 'x" onerror="alert(4)'}},
    {"output_type": "stream", "name": "stdout", "text": "printed\n"},
]


def test_safe_output_keeps_only_passive_types():
    data, _, dropped = safe_output(HOSTILE[0]["data"], {})
    assert data == {"text/plain": "a table"}
    assert set(dropped) == {"text/html", "application/javascript"}
    svg, _, _ = safe_output(HOSTILE[1]["data"], {})
    assert list(svg) == ["text/html"] and svg["text/html"].startswith(
        '<img src="data:image/svg+xml;'
    )
    assert "<script" not in svg["text/html"]  # the SVG is base64 inside the data URI
    md, _, dropped = safe_output(HOSTILE[2]["data"], {})
    assert md == {"text/plain": "<b onclick=x>hi</b>"}
    assert dropped == ["text/markdown (raw HTML or unsafe link)"]
    ok, _, dropped = safe_output(HOSTILE[3]["data"], {"image/png": {"width": 3, "onload": "x"}})
    assert ok == {"text/markdown": "**fine**", "image/png": PNG} and dropped == []
    assert safe_output(HOSTILE[4]["data"], {})[0] == {}


@pytest.fixture
def shown(monkeypatch):
    calls = []
    monkeypatch.setattr(
        export_magics, "display", lambda data, **kw: calls.append((data, kw.get("metadata")))
    )
    return calls


def active(calls) -> list[str]:
    """Active markers in what would be rendered (text/plain is shown as text, never rendered)."""
    text = repr([{k: v for k, v in d.items() if k != "text/plain"} for d, _ in calls])
    return [m for m in ("onerror", "alert(", "javascript", "<script", "onclick") if m in text]


def test_untrusted_blob_shows_no_active_content(ip, kp_home, shown, capsys):
    alice = keys.generate_identity("alice")
    armored, _ = encrypt_outputs(HOSTILE, recipients=["alice"])
    ip.magics_manager.registry["ExportMagics"].blobs["b1"] = armored
    ip.run_line_magic("secure_show", f"b1 -i {alice.path} --for 0")
    assert active(shown) == []
    texts = [d.get("text/plain") for d, _ in shown]
    assert "a table" in texts and "printed\n" in texts
    note = capsys.readouterr().out
    assert "unsigned" in note and "application/javascript" in note and "text/html" in note


def test_blob_signed_by_a_trusted_signer_is_shown_as_is(ip, kp_home, shown):
    alice = keys.generate_identity("alice")
    signing.generate_signing_key("me")
    armored, _ = encrypt_outputs(HOSTILE[:1], recipients=["alice"], sign_with="me")
    ip.magics_manager.registry["ExportMagics"].blobs["b2"] = armored
    ip.run_line_magic("secure_show", f"b2 -i {alice.path} --for 0")
    assert "text/html" not in shown[0][0]  # signed, but by nobody we trust yet
    trust.add_trusted("me")
    ip.run_line_magic("secure_show", f"b2 -i {alice.path} --for 0")
    assert shown[-1][0]["text/html"] == "<img src=x onerror=alert(1)>"


# Markdown links a renderer turns into javascript: (or other active) hrefs, as an attacker writes them.
HOSTILE_MARKDOWN = [
    "[x](javascript:alert(1))",
    "[x](&#106;avascript:alert(1))",
    "[x](&#x6A;avascript:alert(1))",
    "[x](javascript&colon;alert(1))",
    "[x](java&#9;script:alert(1))",
    "[x](java&NewLine;script:alert(1))",
    "[x](JaVaScRiPt:alert(1))",
    "[x](\x01javascript:alert(1))",
    "[x](java\x00script:alert(1))",
    "[x](javascript\\:alert(1))",
    "[x](&amp;#106;avascript:alert(1))",
    "[x][1]\n\n[1]: javascript:alert(1)",
    "[x][evil]\n\n[evil]:\n   &#x6a;avascript:alert(1)",
    "![img](vbscript:msgbox(1))",
    "[x](data:text/html;base64,PHNjcmlwdD4=)",
    "<javascript:alert(1)>",
    "[x]( <javascript:alert(1)> )",
]
PASSIVE_MARKDOWN = [
    "**bold** and [docs](https://example.org/a?b=c#d)",
    "[mail](mailto:a@example.org) [rel](results/table.md) [anchor](#section-2)",
    "[ref][1]\n\n[1]: http://example.org",
]


@pytest.mark.parametrize("markdown", HOSTILE_MARKDOWN)
def test_markdown_with_an_active_link_is_shown_only_as_plain_text(markdown):
    data, _, dropped = safe_output({"text/markdown": markdown}, {})
    assert data == {"text/plain": plain_text(markdown)} and dropped == [
        "text/markdown (raw HTML or unsafe link)"
    ]


@pytest.mark.parametrize("markdown", PASSIVE_MARKDOWN)
def test_markdown_with_web_mail_and_relative_links_still_renders(markdown):
    assert safe_output({"text/markdown": markdown}, {}) == ({"text/markdown": markdown}, {}, [])


# What an attacker who knows alice's public key puts in an "encrypted output" for her to show.
MATHJAX_AND_BEACONS = [
    {"output_type": "display_data", "data": {"text/markdown": r"$\href{javascript:alert(5)}{x}$"}},
    {"output_type": "display_data", "data": {"text/markdown": r"$$\style{color:red}{boo}$$"}},
    {"output_type": "display_data", "data": {"text/markdown": r"\(\class{x}{y}\) and \[z\]"}},
    {
        "output_type": "display_data",
        "data": {"text/markdown": "**hi** ![](https://beacon.example.net/p.gif?u=alice) bye"},
    },
    {
        "output_type": "display_data",
        "data": {"text/markdown": "![a][r]\n\n[r]: //beacon.example.net/q.gif"},
    },
    {
        "output_type": "stream",
        "name": "stdout",
        "text": "\x1b]8;;https://evil.example/x\x07click me\x1b]8;;\x07 \x1b[2K\x1b[32mok\x1b[0m\n",
    },
]


def test_untrusted_math_remote_images_and_terminal_escapes_are_shown_inert(
    ip, kp_home, shown, capsys
):
    alice = keys.generate_identity("alice")
    armored, _ = encrypt_outputs(MATHJAX_AND_BEACONS, recipients=["alice"])
    ip.magics_manager.registry["ExportMagics"].blobs["b3"] = armored
    ip.run_line_magic("secure_show", f"b3 -i {alice.path} --for 0")
    rendered = [d["text/markdown"] for d, _ in shown if "text/markdown" in d]
    # Math is never handed to a Markdown (MathJax) renderer: shown as literal text.
    assert not [m for m in rendered if "$" in m or "\\(" in m or "\\[" in m]
    texts = [d.get("text/plain", "") for d, _ in shown]
    assert r"$\href{javascript:alert(5)}{x}$" in texts and r"$$\style{color:red}{boo}$$" in texts
    # Remote images never load: replaced by a note naming the host, or the text kept literal.
    assert "**hi** [remote image removed: beacon.example.net] bye" in rendered
    assert not [m for m in rendered if "beacon.example.net/" in m]
    assert "![a][r]\n\n[r]: //beacon.example.net/q.gif" in texts
    # Stream text: no OSC 8 hyperlink, no escape sequences; the plain text stays.
    assert "click me ok\n" in texts
    assert not [t for t in texts if "\x1b" in t or "\x07" in t]
    note = capsys.readouterr().out
    assert "math" in note and "remote image" in note
