//! **Pure.** The `format` file of a tracepoint (`tracefs/events/CATEGORY/NAME/format`) →
//! its id and field layout, and the two layouts the doorbell decodes.
//!
//! The offsets are read from the running kernel, never hard-coded: the raw record of a
//! tracepoint is the kernel's internal `trace_event_raw_*` struct, which may change between
//! versions (fields added, reordered, widened). A field the doorbell needs that is missing,
//! or has a size it cannot read, is an error (and the agent polls), never a guess.

use std::fmt;

/// One `field:` line: where a value lies in the raw record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub offset: usize,
    /// Bytes: 1, 2, 4 or 8 (checked by [`Format::slot`]).
    pub size: usize,
}

impl Slot {
    /// The value at this slot of `raw`, in host byte order (the kernel writes the raw record
    /// with plain stores); `None` when `raw` is too short.
    pub fn read(self, raw: &[u8]) -> Option<u64> {
        let bytes = raw.get(self.offset..self.offset.checked_add(self.size)?)?;
        Some(match *bytes {
            [a] => u64::from(a),
            [a, b] => u64::from(u16::from_ne_bytes([a, b])),
            [a, b, c, d] => u64::from(u32::from_ne_bytes([a, b, c, d])),
            [a, b, c, d, e, f, g, h] => u64::from_ne_bytes([a, b, c, d, e, f, g, h]),
            _ => return None,
        })
    }
}

/// A parsed `format` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Format {
    /// The tracepoint's id: `attr.config` for `perf_event_open`, and the value of the
    /// `common_type` field of its records.
    pub id: u16,
    /// (name, slot) of every field, common ones included, in file order.
    pub fields: Vec<(String, Slot)>,
}

/// Why a `format` file could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("no `ID:` line")]
    NoId,
    #[error("line {line} unreadable: {text:?}")]
    BadLine { line: usize, text: String },
    #[error("no field `{0}`")]
    MissingField(&'static str),
    #[error("field `{name}` is {size} bytes wide (1, 2, 4 or 8 expected)")]
    FieldSize { name: &'static str, size: usize },
}

impl Format {
    /// Parses the text of a `format` file. Lines other than `ID:` and `field:` (the name,
    /// blank lines, `print fmt`) are skipped; a `field:` line that does not parse is an
    /// error, since a layout read half-way could place a field wrongly.
    pub fn parse(text: &str) -> Result<Format, FormatError> {
        let mut id = None;
        let mut fields = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            let bad = || FormatError::BadLine {
                line: n + 1,
                text: line.chars().take(120).collect(),
            };
            if let Some(v) = line.strip_prefix("ID:") {
                id = Some(v.trim().parse::<u16>().map_err(|_| bad())?);
            } else if line.starts_with("field:") {
                fields.push(parse_field(line).ok_or_else(bad)?);
            }
        }
        Ok(Format {
            id: id.ok_or(FormatError::NoId)?,
            fields,
        })
    }

    /// The slot of field `name`, which must be 1, 2, 4 or 8 bytes wide.
    pub fn slot(&self, name: &'static str) -> Result<Slot, FormatError> {
        let slot = self
            .fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|&(_, s)| s)
            .ok_or(FormatError::MissingField(name))?;
        if matches!(slot.size, 1 | 2 | 4 | 8) {
            Ok(slot)
        } else {
            Err(FormatError::FieldSize {
                name,
                size: slot.size,
            })
        }
    }
}

/// `field:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;` → ("skaddr", 8, 8).
/// The name is the declaration's last word, without `*` and array brackets
/// (`__u8 saddr[4]` → `saddr`).
fn parse_field(line: &str) -> Option<(String, Slot)> {
    let mut parts = line.split(';').map(str::trim);
    let decl = parts.next()?.strip_prefix("field:")?;
    let (mut offset, mut size) = (None, None);
    for p in parts {
        if let Some(v) = p.strip_prefix("offset:") {
            offset = Some(v.parse().ok()?);
        } else if let Some(v) = p.strip_prefix("size:") {
            size = Some(v.parse().ok()?);
        }
    }
    let last = decl.split_whitespace().last()?;
    let name = last.split('[').next()?.trim_start_matches('*');
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return None;
    }
    Some((
        name.to_string(),
        Slot {
            offset: offset?,
            size: size?,
        },
    ))
}

/// What the doorbell reads from `sock:inet_sock_set_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetStateLayout {
    pub id: u16,
    pub common_type: Slot,
    pub oldstate: Slot,
    pub newstate: Slot,
    /// Host byte order (the tracepoint stores `ntohs(inet_sport)`).
    pub sport: Slot,
    pub family: Slot,
    pub protocol: Slot,
}

impl SetStateLayout {
    pub fn from_format(f: &Format) -> Result<SetStateLayout, FormatError> {
        Ok(SetStateLayout {
            id: f.id,
            common_type: f.slot("common_type")?,
            oldstate: f.slot("oldstate")?,
            newstate: f.slot("newstate")?,
            sport: f.slot("sport")?,
            family: f.slot("family")?,
            protocol: f.slot("protocol")?,
        })
    }
}

/// What the doorbell reads from `syscalls:sys_exit_bind`: only which tracepoint a record
/// came from (the process is in the sample header); `ret` must exist for the filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindLayout {
    pub id: u16,
    pub common_type: Slot,
}

impl BindLayout {
    pub fn from_format(f: &Format) -> Result<BindLayout, FormatError> {
        f.slot("ret")?;
        Ok(BindLayout {
            id: f.id,
            common_type: f.slot("common_type")?,
        })
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}+{}", self.offset, self.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SET_STATE: &str = include_str!("../../../tests/data/tracefs/inet_sock_set_state.format");
    const EXIT_BIND: &str = include_str!("../../../tests/data/tracefs/sys_exit_bind.format");

    fn slot(offset: usize, size: usize) -> Slot {
        Slot { offset, size }
    }

    #[test]
    fn the_captured_formats_give_the_layouts_measured_on_linux_6_18() {
        let f = Format::parse(SET_STATE).unwrap();
        assert_eq!(f.id, 2287);
        let names: Vec<&str> = f.fields.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "common_type",
                "common_flags",
                "common_preempt_count",
                "common_pid",
                "skaddr",
                "oldstate",
                "newstate",
                "sport",
                "dport",
                "family",
                "protocol",
                "saddr",
                "daddr",
                "saddr_v6",
                "daddr_v6"
            ]
        );
        assert_eq!(
            SetStateLayout::from_format(&f).unwrap(),
            SetStateLayout {
                id: 2287,
                common_type: slot(0, 2),
                oldstate: slot(16, 4),
                newstate: slot(20, 4),
                sport: slot(24, 2),
                family: slot(28, 2),
                protocol: slot(30, 2),
            }
        );
        let b = Format::parse(EXIT_BIND).unwrap();
        assert_eq!(
            BindLayout::from_format(&b).unwrap(),
            BindLayout {
                id: 2237,
                common_type: slot(0, 2)
            }
        );
        assert_eq!(b.slot("ret").unwrap(), slot(16, 8));
    }

    #[test]
    fn field_lines() {
        let check = |line: &str, want: Option<(&str, usize, usize)>| {
            let got = parse_field(line);
            let got = got.as_ref().map(|(n, s)| (n.as_str(), s.offset, s.size));
            assert_eq!(got, want, "{line:?}");
        };
        check(
            "field:int oldstate;\toffset:16;\tsize:4;\tsigned:1;",
            Some(("oldstate", 16, 4)),
        );
        check(
            "field:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;",
            Some(("skaddr", 8, 8)),
        );
        check(
            "field:const void *skaddr;\toffset:8;\tsize:8;\tsigned:0;",
            Some(("skaddr", 8, 8)),
        );
        check(
            "field:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;",
            Some(("saddr_v6", 40, 16)),
        );
        check(
            "field:__data_loc char[] name;\toffset:8;\tsize:4;\tsigned:0;",
            Some(("name", 8, 4)),
        );
        // Fields in another order than the kernel writes them: still read by name.
        check(
            "field:__u16 sport;\tsize:2;\toffset:24;\tsigned:0;",
            Some(("sport", 24, 2)),
        );
        check("field:int oldstate;\toffset:16;\tsigned:1;", None); // no size
        check("field:int oldstate;\toffset:x;\tsize:4;", None);
        check("field:;\toffset:1;\tsize:4;", None);
        check("field:int a-b;\toffset:1;\tsize:4;", None);
    }

    #[test]
    fn broken_or_changed_formats_are_errors() {
        let check = |text: &str, want: FormatError| {
            let got = Format::parse(text).and_then(|f| SetStateLayout::from_format(&f));
            assert_eq!(got, Err(want), "{text:?}");
        };
        check(
            &SET_STATE.replace("ID: 2287", "ID: x"),
            FormatError::BadLine {
                line: 2,
                text: "ID: x".into(),
            },
        );
        check(
            &SET_STATE.replace("ID: 2287", "ID: 70000"),
            FormatError::BadLine {
                line: 2,
                text: "ID: 70000".into(),
            },
        );
        check(&SET_STATE.replace("ID: 2287\n", ""), FormatError::NoId);
        check(
            &SET_STATE.replace("int newstate;", "int new_state;"),
            FormatError::MissingField("newstate"),
        );
        check(
            &SET_STATE.replace(
                "field:__u16 sport;\toffset:24;\tsize:2;",
                "field:__u16 sport;\toffset:24;\tsize:3;",
            ),
            FormatError::FieldSize {
                name: "sport",
                size: 3,
            },
        );
        check(
            &SET_STATE.replace("offset:28;", "offset:;"),
            FormatError::BadLine {
                line: 14,
                text: "field:__u16 family;\toffset:;\tsize:2;\tsigned:0;".into(),
            },
        );
        check("", FormatError::NoId);
        assert_eq!(
            Format::parse(&EXIT_BIND.replace("long ret;", "long rv;"))
                .and_then(|f| BindLayout::from_format(&f)),
            Err(FormatError::MissingField("ret"))
        );
    }

    #[test]
    fn slots_read_host_order_and_refuse_short_records() {
        let raw = [1u8, 2, 3, 4, 5, 6, 7, 8, 9];
        assert_eq!(slot(0, 1).read(&raw), Some(1));
        assert_eq!(
            slot(1, 2).read(&raw),
            Some(u64::from(u16::from_ne_bytes([2, 3])))
        );
        assert_eq!(
            slot(0, 4).read(&raw),
            Some(u64::from(u32::from_ne_bytes([1, 2, 3, 4])))
        );
        assert_eq!(
            slot(1, 8).read(&raw),
            Some(u64::from_ne_bytes([2, 3, 4, 5, 6, 7, 8, 9]))
        );
        assert_eq!(slot(2, 8).read(&raw), None); // one byte past the end
        assert_eq!(slot(0, 3).read(&raw), None);
        assert_eq!(slot(usize::MAX, 2).read(&raw), None); // no overflow
    }
}
