"""MkDocs hook (mkdocs.yml `hooks:`): a `<placeholder>` in prose or a docstring shows as text, not as an HTML tag.

Docstrings name paths such as <run_dir>/tb, <dir>/train/<class> or b<B>/t<trial>; Markdown passes `<name>` through
as raw HTML, which the browser hides (and `<B>` would turn the rest of the paragraph bold). This inline pattern runs
after code spans (which are already safe) and before Markdown's raw-HTML pattern, and turns a `<name>` that is not
a lower-case HTML element into literal text. It is added before mkdocstrings reads the Markdown extensions, so the
API pages get it too. Not part of the site: mkdocs.yml excludes it from the pages.
"""

from __future__ import annotations

import re

from markdown import Extension, Markdown
from markdown.inlinepatterns import InlineProcessor
from markdown.util import AtomicString
from mkdocs.plugins import event_priority

# The elements a Markdown page might legitimately write inline; anything else in <...> is a placeholder.
HTML_ELEMENTS = {"a", "abbr", "b", "br", "code", "del", "em", "i", "img", "ins", "kbd", "mark", "q", "s", "samp",
                 "small", "span", "strong", "sub", "sup", "u", "var", "wbr", "div", "p", "details", "summary"}


class _Placeholder(InlineProcessor):
    def handleMatch(self, m: re.Match, data: str):
        if m.group(1) in HTML_ELEMENTS:
            return None, None, None  # real HTML: leave it to the raw-HTML pattern
        return AtomicString(m.group(0)), m.start(0), m.end(0)  # text; the serializer escapes < and >


class PlaceholderExtension(Extension):
    def extendMarkdown(self, md: Markdown) -> None:
        # backticks run at 190, raw HTML at 90: in between, and after the autolinks <https://...> (120)
        md.inlinePatterns.register(_Placeholder(r"<([A-Za-z_][\w .-]*)>", md), "placeholder", 95)


@event_priority(100)  # before mkdocstrings' on_config copies the extension list
def on_config(config):
    config.markdown_extensions.append(PlaceholderExtension())
    return config
