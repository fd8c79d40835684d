//! The pieces every page is made of: the layout (one `h1`, navigation, the "same as SQL"
//! link, UTC times), links built only from our own paths with agent text
//! percent-encoded into a path segment or a query value, sortable table headers, the
//! pager, and cells for agent text.
//!
//! Agent text is hostile: maud escapes `<`, `>`, `&`, `"` and `'` in every value, and
//! [`text`] also shows control and invisible formatting characters (terminal escapes,
//! bidirectional overrides) as visible escapes, as the CLI tables do. No agent value is
//! ever the start of an `href`: links are `/path?query` strings made here.

use std::borrow::Cow;

use maud::{DOCTYPE, Markup, html};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use super::params::{Dir, Params};

/// What a path segment keeps unencoded: unreserved characters only (RFC 3986).
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The mark of a trap socket (an IPv6 socket that accepts IPv4 too), as the agent's scan
/// table shows it.
pub const TRAP_MARK: &str = "!";

/// What the trap mark means (its title, and the legend under tables that show it).
pub const TRAP_LEGEND: &str = "IPv6 socket that also accepts IPv4 (IPV6_V6ONLY=0): netstat \
     and lsof show it as IPv6 only (tcp6 :::PORT), but IPv4 clients reach it.";

/// Agent text as it may be shown: control and invisible formatting characters as
/// visible escapes (`\u{1b}`); maud escapes the markup characters.
pub fn text(s: &str) -> Cow<'_, str> {
    match listenscope_core::record::escape_unsafe(s) {
        Some(escaped) => Cow::Owned(escaped),
        None => Cow::Borrowed(s),
    }
}

/// `/hosts/NAME` with the name percent-encoded as one path segment.
pub fn host_href(host: &str) -> String {
    format!("/hosts/{}", utf8_percent_encode(host, SEGMENT))
}

/// `path?k=v&…` with the values form-encoded; pairs with empty values are left out.
pub fn href(path: &str, pairs: &[(&str, String)]) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    let mut any = false;
    for (k, v) in pairs {
        if !v.is_empty() {
            q.append_pair(k, v);
            any = true;
        }
    }
    if any {
        format!("{path}?{}", q.finish())
    } else {
        path.to_string()
    }
}

/// The state a page's links carry: its path and the parameters that make its view.
#[derive(Debug, Clone)]
pub struct View {
    pub path: String,
    /// The page's own parameters (filters, order, page), in a fixed order.
    pub pairs: Vec<(&'static str, String)>,
}

impl View {
    /// This view with `changes` applied (an empty value removes the parameter).
    pub fn with(&self, changes: &[(&'static str, String)]) -> String {
        let mut pairs = self.pairs.clone();
        for (k, v) in changes {
            match pairs.iter_mut().find(|(name, _)| name == k) {
                Some(p) => p.1 = v.clone(),
                None => pairs.push((k, v.clone())),
            }
        }
        href(&self.path, &pairs)
    }

    /// The same view's SQL (`sql=1`).
    pub fn sql_href(&self) -> String {
        self.with(&[("sql", "1".into())])
    }

    /// The view itself.
    pub fn here(&self) -> String {
        self.with(&[])
    }
}

/// The navigation entries: path and label.
const NAV: [(&str, &str); 6] = [
    ("/", "Overview"),
    ("/exposure", "Exposure by port"),
    ("/ports", "Ports"),
    ("/hosts", "Hosts"),
    ("/changes", "Changes"),
    ("/stale", "Stale hosts"),
];

/// A whole page: `title` is its one `h1`; `sql` the link to its SQL (absent on the SQL
/// page itself and on error pages).
pub fn page(title: &str, current: &str, sql: Option<&str>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="referrer" content="no-referrer";
                title { (title) " · listenscope" }
                link rel="stylesheet" href="/static/ui.css";
            }
            body {
                header {
                    a class="brand" href="/" { "listenscope" }
                    nav aria-label="Main" {
                        ul {
                            @for (path, label) in NAV {
                                li {
                                    @if path == current {
                                        a href=(path) aria-current="page" { (label) }
                                    } @else {
                                        a href=(path) { (label) }
                                    }
                                }
                            }
                        }
                    }
                }
                main {
                    h1 { (title) }
                    (body)
                }
                footer {
                    p {
                        "Read-only. Times are UTC. "
                        @if let Some(sql) = sql {
                            a href=(sql) { "Same as SQL" }
                            ": the query behind this page, over the documented views."
                        }
                    }
                }
            }
        }
    }
}

/// A sortable column header: a link that sorts by `key` (flipping the direction when it
/// is already the sort), with `aria-sort` on the sorted one.
pub fn sort_th(
    view: &View,
    label: &str,
    key: &str,
    current: &str,
    dir: Dir,
    default_dir: Dir,
) -> Markup {
    let sorted = key == current;
    let next = if sorted { dir.flip() } else { default_dir };
    let link = view.with(&[
        ("sort", key.to_string()),
        ("dir", next.as_str().to_string()),
        ("page", String::new()),
    ]);
    let aria = match (sorted, dir) {
        (false, _) => None,
        (true, Dir::Asc) => Some("ascending"),
        (true, Dir::Desc) => Some("descending"),
    };
    html! {
        th scope="col" aria-sort=[aria] {
            a href=(link) {
                (label)
                @if sorted {
                    span class="dir" aria-hidden="true" {
                        @if dir == Dir::Asc { " ▲" } @else { " ▼" }
                    }
                }
            }
        }
    }
}

/// A plain column header.
pub fn th(label: &str) -> Markup {
    html! { th scope="col" { (label) } }
}

/// Which rows a page shows: `page` (1-based) of `per` rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Paging {
    pub page: usize,
    pub per: usize,
}

impl Paging {
    pub fn from(p: &Params) -> Result<Paging, super::params::BadParam> {
        Ok(Paging {
            page: p.page()?,
            per: p.per()?,
        })
    }

    pub fn offset(self) -> usize {
        (self.page - 1) * self.per
    }

    /// The page's parameters for its links (nothing for the defaults).
    pub fn pairs(self) -> [(&'static str, String); 2] {
        let page = if self.page == 1 {
            String::new()
        } else {
            self.page.to_string()
        };
        let per = if self.per == super::params::DEFAULT_PER {
            String::new()
        } else {
            self.per.to_string()
        };
        [("page", page), ("per", per)]
    }
}

/// "Rows A–B of N" and links to the previous and next pages (`total` rows in all).
pub fn pager(view: &View, paging: Paging, shown: usize, total: u64) -> Markup {
    let first = paging.offset() + 1;
    let last = paging.offset() + shown;
    let pages = total.div_ceil(paging.per as u64).max(1);
    let has_next = (last as u64) < total && paging.page < super::params::MAX_PAGE;
    html! {
        nav class="pager" aria-label="Pages" {
            p {
                @if shown == 0 {
                    "No rows on page " (paging.page) " of " (pages) " (" (total) " in all)."
                } @else {
                    "Rows " (first) "–" (last) " of " (total) " (page " (paging.page) " of " (pages) "). "
                }
                @if paging.page > 1 {
                    a rel="prev" href=(view.with(&[("page", (paging.page - 1).to_string())])) { "Previous page" }
                    " "
                }
                @if has_next {
                    a rel="next" href=(view.with(&[("page", (paging.page + 1).to_string())])) { "Next page" }
                }
            }
        }
    }
}

/// A verdict as a word with its class (`verdict-open`, …) and, for `restricted`, the
/// conditions after it.
pub fn verdict(v: &str, conditions: &str) -> Markup {
    let class = match v {
        "open" => "verdict verdict-open",
        "restricted" => "verdict verdict-restricted",
        "filtered" => "verdict verdict-filtered",
        "diverted" => "verdict verdict-diverted",
        "n/a" => "verdict verdict-na",
        _ => "verdict verdict-unknown",
    };
    html! {
        span class=(class) { (text(v)) }
        @if !conditions.is_empty() {
            " (" (text(conditions)) ")"
        }
    }
}

/// The trap mark, with what it means as its title and for screen readers.
pub fn trap_mark() -> Markup {
    html! {
        span class="trap" title=(TRAP_LEGEND) {
            span aria-hidden="true" { (TRAP_MARK) }
            span class="sr-only" { "trap: accepts IPv4 too" }
        }
    }
}

/// The legend of the trap mark, under tables that show it.
pub fn trap_legend() -> Markup {
    html! {
        p class="legend" {
            (trap_mark()) " = " (TRAP_LEGEND)
        }
    }
}

/// A code block (SQL, a command line).
pub fn code_block(s: &str) -> Markup {
    html! { pre { code { (s) } } }
}

/// A `<p>` for an empty result.
pub fn none(what: &str) -> Markup {
    html! { p class="empty" { (what) } }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Control characters and bidirectional overrides already in a database (rows from
    /// before the protocol edge refused them) show as visible escapes; markup characters
    /// are maud's to escape, and are.
    #[test]
    fn hostile_text_is_shown_as_text() {
        let hostile = "\u{1b}]0;pwned\u{7}ev\u{202e}il<script>";
        assert_eq!(text(hostile), "\\u{1b}]0;pwned\\u{7}ev\\u{202e}il<script>");
        let rendered = html! { td { (text(hostile)) } }.into_string();
        assert_eq!(
            rendered,
            "<td>\\u{1b}]0;pwned\\u{7}ev\\u{202e}il&lt;script&gt;</td>"
        );
        assert!(matches!(text("plain"), Cow::Borrowed("plain")));
    }

    /// Agent text reaches a link only percent-encoded, inside our own path or query.
    #[test]
    fn links_encode_agent_text() {
        assert_eq!(host_href("web-01.example"), "/hosts/web-01.example");
        assert_eq!(
            host_href("javascript:alert(1)/../x"),
            "/hosts/javascript%3Aalert%281%29%2F..%2Fx"
        );
        assert_eq!(
            href(
                "/changes",
                &[("host", "a&b=c".into()), ("port", String::new())]
            ),
            "/changes?host=a%26b%3Dc"
        );
        assert_eq!(href("/ports", &[]), "/ports");
        let view = View {
            path: "/exposure".into(),
            pairs: vec![("port", "80".into()), ("page", "2".into())],
        };
        assert_eq!(view.with(&[("page", String::new())]), "/exposure?port=80");
        assert_eq!(view.sql_href(), "/exposure?port=80&page=2&sql=1");
    }
}
