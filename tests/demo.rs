//! `line-retry-proxy demo` as a user runs it: the real binary, its table read back and
//! checked for coherence. The bare bot must show duplicates (the point of the demo),
//! the proxied one none and no loss, and the README must show what the demo prints.

mod support;

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use support::output_within;

const BIN: &str = env!("CARGO_BIN_EXE_line-retry-proxy");
/// A 60-send demo takes about a second; this bounds a hung one.
const LIMIT: Duration = Duration::from_secs(60);

struct Table {
    /// Label → (bot -> LINE, bot -> proxy -> LINE); "-" where a column has no value.
    rows: HashMap<String, (String, String)>,
    text: String,
}

impl Table {
    fn parse(text: String) -> Table {
        let mut rows = HashMap::new();
        for line in text.lines() {
            // A row: a label (indented for a detail of the row above), then two cells.
            let numeric = |c: &str| c == "-" || c.parse::<u64>().is_ok();
            let mut cells = line.split_whitespace().rev();
            let (Some(right), Some(left)) = (cells.next(), cells.next()) else {
                continue;
            };
            let label = line
                .trim_end()
                .strip_suffix(right)
                .and_then(|rest| rest.trim_end().strip_suffix(left))
                .map(str::trim_end)
                .unwrap_or_default();
            if !label.trim().is_empty() && numeric(left) && numeric(right) {
                rows.insert(label.to_owned(), (left.to_owned(), right.to_owned()));
            }
        }
        Table { rows, text }
    }

    /// The lines around the table: what the run was, and its conclusion.
    fn prose(&self) -> Vec<&str> {
        self.text
            .lines()
            .filter(|l| {
                let mut cells = l.split_whitespace().rev();
                let right = cells.next().unwrap_or_default();
                !(right == "-"
                    || right.parse::<u64>().is_ok()
                    || l.ends_with("bot -> proxy -> LINE"))
            })
            .collect()
    }

    fn bare(&self, label: &str) -> u64 {
        self.cell(label, |(bare, _)| bare)
    }

    fn proxied(&self, label: &str) -> u64 {
        self.cell(label, |(_, proxied)| proxied)
    }

    fn cell(&self, label: &str, pick: fn(&(String, String)) -> &String) -> u64 {
        let row = self
            .rows
            .get(label)
            .unwrap_or_else(|| panic!("no row {label:?} in:\n{}", self.text));
        pick(row)
            .parse()
            .unwrap_or_else(|_| panic!("row {label:?} is not a number:\n{}", self.text))
    }
}

/// Runs the demo as the README shows it.
fn demo_default() -> (i32, Table) {
    run(&["demo"])
}

/// Runs the demo with a number of sends and a seed.
fn demo(sends: u32, seed: u64) -> (i32, Table) {
    run(&[
        "demo",
        &format!("--sends={sends}"),
        &format!("--seed={seed}"),
    ])
}

/// Runs the binary with `args`; returns its exit code and its table.
fn run(args: &[&str]) -> (i32, Table) {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    let out = output_within(&mut cmd, LIMIT, "line-retry-proxy demo");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.is_empty(), "the demo is quiet on stderr: {stderr}");
    (out.status.code().unwrap_or(-1), Table::parse(text))
}

#[test]
fn the_bare_bot_duplicates_and_the_proxied_one_delivers_each_message_once() {
    let sends = 60;
    let (code, t) = demo(sends, 3);
    assert_eq!(code, 0, "exit 0 when the proxied run is exact:\n{}", t.text);
    let sends = u64::from(sends);

    for get in [Table::bare, Table::proxied] {
        assert_eq!(get(&t, "messages to send"), sends);
        // Deliveries are counted where they happen, at the fake LINE.
        assert_eq!(
            get(&t, "deliveries"),
            get(&t, "messages delivered") + get(&t, "duplicate deliveries"),
            "{}",
            t.text
        );
        assert_eq!(
            get(&t, "messages delivered") + get(&t, "lost messages"),
            sends
        );
        assert!(get(&t, "requests sent by the bot") >= sends);
        assert!(
            get(&t, "  delivered all the same") <= get(&t, "messages the bot gave up on"),
            "{}",
            t.text
        );
    }

    // Straight to LINE: every bot request reaches it, nothing is refused (no key), and
    // the bot's resends after "accepted, then failed" are duplicates.
    assert_eq!(
        t.bare("requests that reached LINE"),
        t.bare("requests sent by the bot"),
        "{}",
        t.text
    );
    assert_eq!(t.bare("  refused: key already accepted (409)"), 0);
    assert!(
        t.bare("duplicate deliveries") > 0,
        "with seed 3 the bare bot delivers some messages twice:\n{}",
        t.text
    );

    // Through the proxy: each message exactly once, the bot never gave up, and every
    // request that was answered is counted under one outcome.
    assert_eq!(t.proxied("duplicate deliveries"), 0, "{}", t.text);
    assert_eq!(t.proxied("lost messages"), 0, "{}", t.text);
    assert_eq!(t.proxied("deliveries"), sends, "{}", t.text);
    assert_eq!(t.proxied("messages the bot gave up on"), 0, "{}", t.text);
    assert_eq!(t.proxied("  answered 5xx"), 0, "{}", t.text);
    assert!(
        t.proxied("  refused: key already accepted (409)") > 0,
        "the proxy's retries of accepted sends met LINE's 409:\n{}",
        t.text
    );
    let answered: u64 = [
        "fresh",
        "replayed",
        "coalesced",
        "conflict-resolved",
        "error",
    ]
    .iter()
    .map(|o| t.proxied(&format!("proxy answers: {o}")))
    .sum();
    assert!(
        answered >= sends && answered <= t.proxied("requests sent by the bot"),
        "{}",
        t.text
    );
    assert_eq!(t.proxied("proxy answers: error"), 0, "{}", t.text);
    assert!(
        t.text
            .contains("every message was delivered exactly once: 0 duplicates, 0 lost"),
        "{}",
        t.text
    );
}

#[test]
fn the_readme_shows_what_the_demo_prints() {
    // The bare run's course does not change from run to run: every fault is decided by
    // the seed, and a held answer outlasts the bot's timeout. So the README's output
    // (the default run) repeats, but for which of the proxy's answers were coalesced
    // and which replayed: that depends on when a resend arrives. A machine so loaded
    // that an ordinary exchange outlasts the bot's 200ms timeout changes the bare
    // course too, so a differing run is tried again, at most three times in all; a
    // README that is out of date differs every time.
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md is readable");
    let shown = readme
        .split_once("## Try it without a LINE account")
        .and_then(|(_, rest)| rest.split_once("```text\n"))
        .and_then(|(_, rest)| rest.split_once("```"))
        .map(|(block, _)| block.to_owned())
        .expect("the README shows the demo's output in a text block");
    assert!(readme.contains("cargo run --release -- demo"));
    let shown = Table::parse(shown);
    let mut last = Vec::new();
    for _ in 0..3 {
        let (code, now) = demo_default();
        assert_eq!(code, 0, "{}", now.text);
        assert!(now.rows.len() > 15, "{}", now.text);
        last = differences(&shown, &now);
        if last.is_empty() {
            return;
        }
    }
    panic!(
        "the README's demo output differs from three runs; the last:\n{}",
        last.join("\n")
    );
}

/// Where a run differs from the README: the prose, the rows, every row of the bare
/// column, and the rows of the proxied column that timing cannot change.
fn differences(shown: &Table, now: &Table) -> Vec<String> {
    let mut found = Vec::new();
    if shown.prose() != now.prose() {
        found.push(format!(
            "the text: README\n{}\nnow\n{}",
            shown.text, now.text
        ));
    }
    let sorted = |t: &Table| {
        let mut l: Vec<String> = t.rows.keys().cloned().collect();
        l.sort();
        l
    };
    if sorted(shown) != sorted(now) {
        found.push(format!(
            "the rows: README {:?}, now {:?}",
            sorted(shown),
            sorted(now)
        ));
        return found;
    }
    for label in sorted(now) {
        if shown.rows[&label].0 != now.rows[&label].0 {
            found.push(format!(
                "bare column, row {label:?}: README {}, now {}",
                shown.rows[&label].0, now.rows[&label].0
            ));
        }
    }
    for label in [
        "messages to send",
        "messages the bot gave up on",
        "deliveries",
        "messages delivered",
        "duplicate deliveries",
        "lost messages",
        "proxy answers: error",
    ] {
        if shown.rows[label].1 != now.rows[label].1 {
            found.push(format!(
                "proxied column, row {label:?}: README {}, now {}",
                shown.rows[label].1, now.rows[label].1
            ));
        }
    }
    found
}
