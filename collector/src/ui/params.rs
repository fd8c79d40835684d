//! The query string of a UI page: every filter, page and order is a parameter there, so
//! a URL is the whole view (shareable in an incident channel). Each page names the
//! parameters it takes; anything else, and any value outside its allowed set, is a
//! [`BadParam`] that the page answers with 400, naming the parameter and what it takes.
//! An empty value (an empty form field) means the parameter is absent.

use time::OffsetDateTime;

use crate::history;

/// Most parameters one query string may carry.
const MAX_PAIRS: usize = 32;
/// Longest value of one parameter, in bytes.
const MAX_VALUE: usize = 512;

/// Rows per page unless `per` says otherwise.
pub const DEFAULT_PER: usize = 50;
/// Most rows one page shows.
pub const MAX_PER: usize = 500;
/// Highest page number: with [`MAX_PER`], at most 5,000,000 rows are skipped, and a
/// deep page costs what it skips (OFFSET).
pub const MAX_PAGE: usize = 10_000;

/// A parameter the page cannot take: its name, the value given (cut), and what it takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadParam {
    pub name: String,
    pub value: String,
    pub allowed: String,
}

impl BadParam {
    fn new(name: &str, value: &str, allowed: impl Into<String>) -> BadParam {
        let mut value = value.to_string();
        if value.len() > 80 {
            let mut cut = 80;
            while !value.is_char_boundary(cut) {
                cut -= 1;
            }
            value.truncate(cut);
            value.push('…');
        }
        BadParam {
            name: name.to_string(),
            value,
            allowed: allowed.into(),
        }
    }
}

/// The direction of a sort.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    Asc,
    Desc,
}

impl Dir {
    pub fn as_str(self) -> &'static str {
        match self {
            Dir::Asc => "asc",
            Dir::Desc => "desc",
        }
    }

    pub fn flip(self) -> Dir {
        match self {
            Dir::Asc => Dir::Desc,
            Dir::Desc => Dir::Asc,
        }
    }
}

/// The parsed query string of one request.
#[derive(Debug, Clone, Default)]
pub struct Params {
    pairs: Vec<(String, String)>,
}

impl Params {
    /// Parses `raw` (without the `?`), accepting only the names in `allowed` (plus `sql`,
    /// which every page takes), each at most once.
    pub fn parse(raw: Option<&str>, allowed: &[&str]) -> Result<Params, BadParam> {
        let mut pairs: Vec<(String, String)> = Vec::new();
        let names = || {
            let mut all: Vec<&str> = allowed.to_vec();
            all.push("sql");
            all.join(", ")
        };
        for (k, v) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
            if pairs.len() == MAX_PAIRS {
                return Err(BadParam::new(
                    &k,
                    &v,
                    format!("at most {MAX_PAIRS} parameters"),
                ));
            }
            if k != "sql" && !allowed.contains(&k.as_ref()) {
                return Err(BadParam::new(
                    &k,
                    &v,
                    format!("no such parameter here; this page takes {}", names()),
                ));
            }
            if v.len() > MAX_VALUE {
                return Err(BadParam::new(&k, &v, format!("at most {MAX_VALUE} bytes")));
            }
            if pairs.iter().any(|(name, _)| *name == k) {
                return Err(BadParam::new(&k, &v, "the parameter once"));
            }
            pairs.push((k.into_owned(), v.into_owned()));
        }
        Ok(Params { pairs })
    }

    /// The value of `name`; an empty one counts as absent.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, v)| k == name && !v.is_empty())
            .map(|(_, v)| v.as_str())
    }

    /// `sql=1`: show the SQL behind the page instead of its answer.
    pub fn sql(&self) -> Result<bool, BadParam> {
        match self.get("sql") {
            None | Some("0") => Ok(false),
            Some("1") => Ok(true),
            Some(v) => Err(BadParam::new("sql", v, "1 (show the SQL) or 0")),
        }
    }

    /// `port`: 1 to 65535; absent means every port.
    pub fn port(&self) -> Result<Option<u16>, BadParam> {
        let Some(v) = self.get("port") else {
            return Ok(None);
        };
        match v.trim().parse::<u16>() {
            Ok(p) if p > 0 => Ok(Some(p)),
            _ => Err(BadParam::new(
                "port",
                v,
                "a port number from 1 to 65535, or nothing for every port",
            )),
        }
    }

    /// `proto`: `tcp` or `udp`; absent means both.
    pub fn proto(&self) -> Result<Option<&'static str>, BadParam> {
        match self.get("proto") {
            None => Ok(None),
            Some("tcp") => Ok(Some("tcp")),
            Some("udp") => Ok(Some("udp")),
            Some(v) => Err(BadParam::new("proto", v, "tcp or udp, or nothing for both")),
        }
    }

    /// `host`: a host name as the collector records it (lower case, no trailing dot).
    pub fn host(&self) -> Result<Option<String>, BadParam> {
        let Some(v) = self.get("host") else {
            return Ok(None);
        };
        let v = v.trim();
        match crate::tls::canonical_host_name(v) {
            Some(h) => Ok(Some(h)),
            None => Err(BadParam::new(
                "host",
                v,
                "a host name as the hosts page lists it (letters, digits, '-', '.')",
            )),
        }
    }

    /// `page`: 1 to [`MAX_PAGE`], default 1.
    pub fn page(&self) -> Result<usize, BadParam> {
        let Some(v) = self.get("page") else {
            return Ok(1);
        };
        match v.trim().parse::<usize>() {
            Ok(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
            _ => Err(BadParam::new(
                "page",
                v,
                format!("a page number from 1 to {MAX_PAGE}"),
            )),
        }
    }

    /// `per`: rows per page, 1 to [`MAX_PER`], default [`DEFAULT_PER`].
    pub fn per(&self) -> Result<usize, BadParam> {
        let Some(v) = self.get("per") else {
            return Ok(DEFAULT_PER);
        };
        match v.trim().parse::<usize>() {
            Ok(n) if (1..=MAX_PER).contains(&n) => Ok(n),
            _ => Err(BadParam::new(
                "per",
                v,
                format!("rows per page, from 1 to {MAX_PER} (default {DEFAULT_PER})"),
            )),
        }
    }

    /// `sort`: one of `columns` (name in the URL, value), default the first.
    pub fn sort<C: Copy>(
        &self,
        columns: &[(C, &'static str)],
    ) -> Result<(C, &'static str), BadParam> {
        let Some(v) = self.get("sort") else {
            return Ok(columns[0]);
        };
        columns
            .iter()
            .find(|(_, name)| *name == v)
            .copied()
            .ok_or_else(|| {
                let names: Vec<&str> = columns.iter().map(|(_, n)| *n).collect();
                BadParam::new("sort", v, format!("one of {}", names.join(", ")))
            })
    }

    /// `dir`: `asc` or `desc`, default `default`.
    pub fn dir(&self, default: Dir) -> Result<Dir, BadParam> {
        match self.get("dir") {
            None => Ok(default),
            Some("asc") => Ok(Dir::Asc),
            Some("desc") => Ok(Dir::Desc),
            Some(v) => Err(BadParam::new("dir", v, "asc or desc")),
        }
    }

    /// A time parameter (`since`, `until`) in any form the reports take; `default` when
    /// absent.
    pub fn time(
        &self,
        name: &str,
        default: &str,
        now: OffsetDateTime,
    ) -> Result<(OffsetDateTime, String), BadParam> {
        let text = self.get(name).unwrap_or(default);
        history::parse_time(text, now)
            .map(|t| (t, text.to_string()))
            .map_err(|_| BadParam::new(name, text, history::TIME_FORMS))
    }

    /// `what` itself as a parameter problem (a window too long, an empty one).
    pub fn bad(name: &str, value: &str, allowed: impl Into<String>) -> BadParam {
        BadParam::new(name, value, allowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(raw: &str) -> Params {
        Params::parse(
            Some(raw),
            &[
                "port", "proto", "host", "page", "per", "sort", "dir", "since",
            ],
        )
        .unwrap()
    }

    #[test]
    fn values() {
        assert_eq!(p("port=80").port(), Ok(Some(80)));
        assert_eq!(p("port=").port(), Ok(None));
        assert_eq!(p("").port(), Ok(None));
        assert_eq!(p("proto=udp").proto(), Ok(Some("udp")));
        assert_eq!(p("page=3&per=10").page(), Ok(3));
        assert_eq!(p("page=3&per=10").per(), Ok(10));
        assert_eq!(p("").per(), Ok(DEFAULT_PER));
        assert_eq!(
            p("host=Web-01.Example.").host(),
            Ok(Some("web-01.example".into()))
        );
        assert_eq!(p("dir=desc").dir(Dir::Asc), Ok(Dir::Desc));
        assert_eq!(p("sort=b").sort(&[(1, "a"), (2, "b")]).map(|s| s.0), Ok(2));
        assert_eq!(p("").sort(&[(1, "a"), (2, "b")]).map(|s| s.0), Ok(1));
    }

    #[test]
    fn refusals_name_the_parameter() {
        for (raw, name) in [
            ("port=0", "port"),
            ("port=65536", "port"),
            ("port=http", "port"),
            ("proto=sctp", "proto"),
            ("page=0", "page"),
            ("page=10001", "page"),
            ("per=501", "per"),
            ("dir=up", "dir"),
            ("host=a%20b", "host"),
        ] {
            let q = p(raw);
            let e = [
                q.port().err(),
                q.proto().err(),
                q.page().err(),
                q.per().err(),
                q.dir(Dir::Asc).err(),
                q.host().err(),
            ]
            .into_iter()
            .flatten()
            .next()
            .unwrap_or_else(|| panic!("{raw} accepted"));
            assert_eq!(e.name, name, "{raw}");
            assert!(!e.allowed.is_empty());
        }
        let e = p("sort=x").sort(&[(1, "a"), (2, "b")]).unwrap_err();
        assert_eq!(e.allowed, "one of a, b");
        let e = Params::parse(Some("colour=red"), &["port"]).unwrap_err();
        assert_eq!(e.name, "colour");
        assert!(e.allowed.contains("port, sql"), "{}", e.allowed);
        let e = Params::parse(Some("port=1&port=2"), &["port"]).unwrap_err();
        assert_eq!(e.name, "port");
        let long = "x".repeat(600);
        let e = Params::parse(Some(&format!("port={long}")), &["port"]).unwrap_err();
        assert!(e.value.ends_with('…') && e.value.len() < 100);
    }
}
