//! JSON that is safe to show in a terminal: the same values as serde_json writes, but DEL,
//! C1 controls and invisible formatting characters (bidi overrides, zero-width) are
//! written as `\uXXXX` escapes, as serde_json already does for C0 controls. A value read
//! back is unchanged; the bytes on the screen cannot steer the terminal. Both programs'
//! JSON output goes through it (local process names and agents' text are hostile input).

use std::io::{self, Write};

use serde::Serialize;
use serde_json::value::RawValue;

use crate::record::is_unsafe_char;

/// serde_json's compact formatter with the escapes above.
#[derive(Debug, Clone, Copy, Default)]
pub struct TerminalSafe;

impl serde_json::ser::Formatter for TerminalSafe {
    fn write_string_fragment<W: ?Sized + Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        // Every character to escape is DEL or beyond ASCII: plain ASCII goes out as is.
        if fragment.bytes().all(|b| b < 0x7f) {
            return writer.write_all(fragment.as_bytes());
        }
        let mut start = 0;
        for (i, c) in fragment.char_indices() {
            // Every unsafe character is in the Basic Multilingual Plane.
            if is_unsafe_char(c) {
                writer.write_all(&fragment.as_bytes()[start..i])?;
                write!(writer, "\\u{:04x}", u32::from(c))?;
                start = i + c.len_utf8();
            }
        }
        writer.write_all(&fragment.as_bytes()[start..])
    }
}

/// `serde_json::to_writer` with [`TerminalSafe`].
pub fn to_writer<W: Write, T: ?Sized + Serialize>(
    writer: W,
    value: &T,
) -> Result<(), serde_json::Error> {
    let mut ser = serde_json::Serializer::with_formatter(writer, TerminalSafe);
    value.serialize(&mut ser)
}

/// `serde_json::to_vec` with [`TerminalSafe`].
pub fn to_vec<T: ?Sized + Serialize>(value: &T) -> Result<Vec<u8>, serde_json::Error> {
    let mut out = Vec::with_capacity(128);
    to_writer(&mut out, value)?;
    Ok(out)
}

/// `serde_json::value::to_raw_value` with [`TerminalSafe`].
pub fn to_raw_value<T: ?Sized + Serialize>(value: &T) -> Result<Box<RawValue>, serde_json::Error> {
    let bytes = to_vec(value)?;
    // serde_json wrote it: valid UTF-8 and valid JSON.
    let text = String::from_utf8(bytes).map_err(serde::ser::Error::custom)?;
    RawValue::from_string(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_steers_a_terminal_and_keeps_the_value() {
        let hostile = "a\u{1b}]0;x\u{7}b\u{7f}c\u{9b}d\u{202e}e\u{200b}f é 中 🦀";
        let text = String::from_utf8(to_vec(&hostile).unwrap()).unwrap();
        assert_eq!(
            text,
            "\"a\\u001b]0;x\\u0007b\\u007fc\\u009bd\\u202ee\\u200bf é 中 🦀\""
        );
        assert!(!text.chars().any(is_unsafe_char), "{text:?}");
        let back: String = serde_json::from_str(&text).unwrap();
        assert_eq!(back, hostile);
        let raw = to_raw_value(&["x\u{85}"]).unwrap();
        assert_eq!(raw.get(), "[\"x\\u0085\"]");
        assert_eq!(to_vec("plain").unwrap(), b"\"plain\"");
    }
}
