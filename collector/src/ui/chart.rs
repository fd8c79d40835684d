//! The changes timeline as an inline SVG drawn on the server: one stacked bar per hour
//! (opened, changed, closed), with a title and a description for screen readers, styled
//! by the stylesheet's classes (no inline style: the Content-Security-Policy allows
//! none). The page puts the same counts in a table next to it.

use maud::{Markup, html};

/// One hour of the timeline: its start (`YYYY-MM-DD HH:00`, UTC) and its events.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hour {
    pub start: String,
    pub opened: u64,
    pub changed: u64,
    pub closed: u64,
}

impl Hour {
    pub fn total(&self) -> u64 {
        self.opened + self.changed + self.closed
    }
}

/// Drawing area, in SVG units.
const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 200.0;
/// Room for the axis labels.
const LEFT: f64 = 48.0;
const BOTTOM: f64 = 24.0;
const TOP: f64 = 8.0;

/// The chart of `hours` (every hour of the window, in order, empty ones included).
pub fn timeline(hours: &[Hour], title: &str, description: &str) -> Markup {
    let max = hours.iter().map(Hour::total).max().unwrap_or(0).max(1);
    let plot_w = WIDTH - LEFT - 8.0;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let slot = plot_w / hours.len().max(1) as f64;
    let bar = (slot * 0.8).max(1.0);
    let y_of = |n: u64| TOP + plot_h - plot_h * n as f64 / max as f64;
    // Label the first hour, the last, and about eight in between.
    let every = hours.len().div_ceil(8).max(1);
    html! {
        svg class="chart" role="img" aria-labelledby="chart-title chart-desc"
            viewBox=(format!("0 0 {WIDTH} {HEIGHT}")) preserveAspectRatio="none"
            xmlns="http://www.w3.org/2000/svg" {
            title id="chart-title" { (title) }
            desc id="chart-desc" { (description) }
            line class="axis" x1=(LEFT) y1=(TOP + plot_h) x2=(WIDTH - 8.0) y2=(TOP + plot_h) {}
            line class="axis" x1=(LEFT) y1=(TOP) x2=(LEFT) y2=(TOP + plot_h) {}
            text class="tick" x=(LEFT - 4.0) y=(TOP + 10.0) text-anchor="end" { (max) }
            text class="tick" x=(LEFT - 4.0) y=(TOP + plot_h) text-anchor="end" { "0" }
            @for (i, h) in hours.iter().enumerate() {
                @let x = LEFT + slot * i as f64 + (slot - bar) / 2.0;
                @let parts = [("bar-opened", h.opened), ("bar-changed", h.changed), ("bar-closed", h.closed)];
                g {
                    title { (h.start) " UTC: " (h.opened) " opened, " (h.changed) " changed, " (h.closed) " closed" }
                    @for (j, (class, n)) in parts.iter().enumerate() {
                        @if *n > 0 {
                            @let below: u64 = parts[..j].iter().map(|p| p.1).sum();
                            @let y_top = y_of(below + n);
                            @let y_bottom = y_of(below);
                            rect class=(class) x=(fmt(x)) y=(fmt(y_top)) width=(fmt(bar))
                                height=(fmt(y_bottom - y_top)) {}
                        }
                    }
                }
                // The last hour's label ends at the plot's edge (centred, it would be cut
                // off); a regular one too close before it is left out.
                @if i + 1 == hours.len() {
                    text class="tick" x=(fmt(x + bar)) y=(HEIGHT - 6.0) text-anchor="end" {
                        (h.start.get(5..).unwrap_or(&h.start))
                    }
                } @else if i % every == 0 && hours.len() - 1 - i >= every.div_ceil(2).max(1) {
                    text class="tick" x=(fmt(x + bar / 2.0)) y=(HEIGHT - 6.0) text-anchor="middle" {
                        (h.start.get(5..).unwrap_or(&h.start))
                    }
                }
            }
        }
    }
}

/// A coordinate with two decimals (short SVG).
fn fmt(v: f64) -> String {
    format!("{v:.2}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One rect per non-empty part, stacked, the tallest bar reaching the top.
    #[test]
    fn bars_stack() {
        let hours = vec![
            Hour {
                start: "2026-01-01 00:00".into(),
                opened: 2,
                changed: 1,
                closed: 1,
            },
            Hour {
                start: "2026-01-01 01:00".into(),
                ..Hour::default()
            },
            Hour {
                start: "2026-01-01 02:00".into(),
                closed: 2,
                ..Hour::default()
            },
        ];
        let svg = timeline(&hours, "t", "d").into_string();
        assert_eq!(svg.matches("<rect").count(), 4, "{svg}");
        assert_eq!(svg.matches("class=\"bar-closed\"").count(), 2, "{svg}");
        // The 4-event bar's top part (closed) starts at the top of the plot.
        assert!(svg.contains(&format!("y=\"{}\"", fmt(TOP))), "{svg}");
        assert!(svg.contains("<title id=\"chart-title\">t</title>"));
        assert!(svg.contains("role=\"img\""));
    }
}
