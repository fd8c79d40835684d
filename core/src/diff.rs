//! Changes between two inventories of one host: what opened, closed or changed.
//!
//! Both states are ordered maps, so the diff is one merge pass. Applying the changes of
//! `diff(a, b)` to `a` gives `b` exactly, which is what lets the collector rebuild a
//! host from a snapshot plus deltas (`apply`, tested below).

use std::cmp::Ordering;

use crate::record::{ListenerKey, ListenerRecord, State};

/// What one scan found different from the previous one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    pub opened: Vec<ListenerRecord>,
    pub closed: Vec<ListenerKey>,
    /// Same key, any other field different (full new value).
    pub changed: Vec<ListenerRecord>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.opened.is_empty() && self.closed.is_empty() && self.changed.is_empty()
    }

    /// Number of listener entries carried.
    pub fn len(&self) -> usize {
        self.opened.len() + self.closed.len() + self.changed.len()
    }
}

pub fn diff(old: &State, new: &State) -> Changes {
    let mut out = Changes::default();
    let mut a = old.iter().peekable();
    let mut b = new.iter().peekable();
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some((ka, _)), None) => {
                out.closed.push((*ka).clone());
                a.next();
            }
            (None, Some((_, rb))) => {
                out.opened.push((*rb).clone());
                b.next();
            }
            (Some((ka, ra)), Some((kb, rb))) => match ka.cmp(kb) {
                Ordering::Less => {
                    out.closed.push((*ka).clone());
                    a.next();
                }
                Ordering::Greater => {
                    out.opened.push((*rb).clone());
                    b.next();
                }
                Ordering::Equal => {
                    if ra != rb {
                        out.changed.push((*rb).clone());
                    }
                    a.next();
                    b.next();
                }
            },
        }
    }
    out
}

/// Applies `changes` to `state`. Idempotent: opening an open key replaces it, closing a
/// closed key does nothing.
pub fn apply(state: &mut State, changes: &Changes) {
    for k in &changes.closed {
        state.remove(k);
    }
    for r in changes.opened.iter().chain(&changes.changed) {
        state.insert(r.key.clone(), r.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Reach;
    use crate::record::testkit::record;

    fn state(records: &[ListenerRecord]) -> State {
        records.iter().map(|r| (r.key.clone(), r.clone())).collect()
    }

    #[test]
    fn opened_closed_changed() {
        let a80 = record("host", "::", 80, Some(false));
        let a22 = record("host", "0.0.0.0", 22, None);
        let a443 = record("host", "::", 443, Some(true));
        let mut a80b = a80.clone();
        a80b.reach_ipv4 = Reach::None;
        let b53 = record("blue", "::", 53, Some(false));
        let old = state(&[a80.clone(), a22.clone(), a443.clone()]);
        let new = state(&[a80b.clone(), a443.clone(), b53.clone()]);
        let d = diff(&old, &new);
        assert_eq!(d.opened, vec![b53]);
        assert_eq!(d.closed, vec![a22.key.clone()]);
        assert_eq!(d.changed, vec![a80b]);
        assert_eq!(d.len(), 3);
        let mut rebuilt = old.clone();
        apply(&mut rebuilt, &d);
        assert_eq!(rebuilt, new);
        // Applying twice changes nothing more.
        apply(&mut rebuilt, &d);
        assert_eq!(rebuilt, new);
        assert!(diff(&new, &new).is_empty());
    }

    #[test]
    fn from_and_to_empty() {
        let s = state(&[
            record("host", "::", 80, Some(false)),
            record("host", "::", 81, None),
        ]);
        let up = diff(&State::new(), &s);
        assert_eq!((up.opened.len(), up.closed.len()), (2, 0));
        let down = diff(&s, &State::new());
        assert_eq!((down.opened.len(), down.closed.len()), (0, 2));
    }

    /// v6only is part of the key: flipping it is a close and an open, never a silent edit.
    #[test]
    fn v6only_flip_is_close_and_open() {
        let old = state(&[record("host", "::", 80, Some(true))]);
        let new = state(&[record("host", "::", 80, Some(false))]);
        let d = diff(&old, &new);
        assert_eq!((d.opened.len(), d.closed.len(), d.changed.len()), (1, 1, 0));
    }
}
