"""dtext_to_text: DText markup becomes the plain text a reader of the page sees."""
import pytest

from tagcaption.dtext import dtext_to_text

CASES = [
    ("plain link", "Has [[long_hair]].", "Has long hair."),
    ("link with text", "A [[long_hair|long-haired]] girl.", "A long-haired girl."),
    ("pipe trick", "Like [[Kaga (Kantai Collection)|]] does.", "Like Kaga does."),
    ("glued suffix", "Many [[cat]]s here.", "Many cats here."),
    ("anchor", "See [[touhou#See also]].", "See touhou."),
    ("post search", "Search {{long_hair blue_eyes}}.", "Search long hair blue eyes."),
    ("post search with text", "Try {{1girl solo|this search}}.", "Try this search."),
    ("quoted external link", 'Read "the guide":https://example.com/guide now.', "Read the guide now."),
    ("quoted relative link", 'Read "the guide":[/wiki_pages/help] now.', "Read the guide now."),
    ("quoted relative search link", 'See "long hair":/posts?tags=long_hair.', "See long hair."),
    ("quoted relative wiki link", 'Read "the guide":/wiki_pages/help:api, then tag.', "Read the guide, then tag."),
    ("quoted anchor link", 'Go "up":#top now.', "Go up now."),
    ("a quote and a colon are no link", 'He said "hi": yes.', 'He said "hi": yes.'),
    ("markdown link", "Read [the guide](https://example.com/g) now.", "Read the guide now."),
    ("url tag", "Visit [url=https://x.org]the site[/url].", "Visit the site."),
    ("angle url", "At <https://x.org/a>.", "At https://x.org/a."),
    ("id links stay readable", "See post #123, topic #4/p2 and pixiv #99.", "See post #123, topic #4/p2 and pixiv #99."),
    ("embed line dropped", "Text.\n!post #1234\nMore.", "Text.\n\nMore."),
    ("headers", "h4. Appearance\nTall.", "Appearance\nTall."),
    ("header with id", "h4#see-also. See also\nx", "See also\nx"),
    ("lists", "* one\n** two\n* three", "- one\n  - two\n- three"),
    ("quote", "[quote]Said so.[/quote]", "Said so."),
    ("spoiler", "It is [spoiler]a twist[/spoiler].", "It is a twist."),
    ("spoilers html alias", "<spoilers>secret</spoilers>", "secret"),
    ("expand with title", "[expand=Details]Inner text.[/expand]", "Details\nInner text."),
    ("code kept literal", "[code][[not a link]][/code]", "[[not a link]]"),
    ("fenced code", "```\n[b]raw[/b]\n```", "[b]raw[/b]"),
    ("nodtext literal", "[nodtext][[x]] [b]y[/b] &amp;[/nodtext]", "[[x]] [b]y[/b] &amp;"),
    ("nodtext html alias", "<nodtext>{{a}}</nodtext>", "{{a}}"),
    ("inline tags", "[b]bold[/b] [i]it[/i] [u]u[/u] [s]s[/s] [tn]note[/tn]", "bold it u s note"),
    ("html inline aliases", "<b>b</b> <strong>s</strong> <em>e</em> <i>i</i> <u>u</u> <s>x</s> <tn>t</tn>", "b s e i u x t"),
    ("breaks", "a[br]b<br>c", "a\nb\nc"),
    ("table", "[table][tr][th]A[/th][th]B[/th][/tr][tr][td]1[/td][td]2[/td][/tr][/table]", "A | B\n1 | 2"),
    ("dtext entities", "&lbrack;x&rbrack; &lbrace;y&rbrace; &lpar;z&rpar; &ast; &colon; &commat; &grave; &num; &period;",
     "[x] {y} (z) * : @ ` # ."),
    ("html entities", "&amp; &lt;b&gt; &quot;q&quot; &#39;s &apos;", "& <b> \"q\" 's '"),
    ("entities never form links", "&lbrack;&lbrack;tag&rbrack;&rbrack;", "[[tag]]"),
    ("blank lines collapse", "a\n\n\n\nb", "a\n\nb"),
    ("crlf", "a\r\nb", "a\nb"),
]


@pytest.mark.parametrize("body, expected", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_dtext_to_text(body, expected):
    assert dtext_to_text(body) == expected
