//! Log output: text or JSON lines, filtered with `RUST_LOG` (default `info`).
//! Nothing on the request path logs a credential or a body: the access line carries
//! method, path, endpoint, key, outcome, attempts, statuses and latency only.
//!
//! Every line, tracing's events and the access line alike, goes into one buffer in
//! memory that a thread of its own writes to stderr: a request never waits on
//! `write(2)`, and under load many lines leave in one write. A line appears at most
//! [`FLUSH_EVERY`] after it was logged. Should stderr stop taking lines, the buffer
//! stops at [`MAX_PENDING`] and later lines are dropped and counted, not queued without
//! bound; the count is written once stderr moves again.
//!
//! The access line is written by [`access`], not by tracing's generic formatters: it is
//! the one line per request, and formatting its fields directly costs a fraction of
//! what a field visitor does. It honours `RUST_LOG` like any event of its target.

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use http::Method;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;
use crate::domain::RetryKey;

/// The target of the access line, for `RUST_LOG` (`line_retry_proxy::access=off`).
pub(crate) const ACCESS_TARGET: &str = "line_retry_proxy::access";
/// How long a line may wait in the buffer: lines logged within it leave together.
pub(crate) const FLUSH_EVERY: Duration = Duration::from_millis(10);
/// A buffer this full is written at once, without waiting for the tick.
const FLUSH_AT: usize = 256 * 1024;
/// Past this many bytes waiting (stderr blocked), lines are dropped and counted.
const MAX_PENDING: usize = 8 * 1024 * 1024;

/// The log output of this process, set once by [`init`].
static OUTPUT: OnceLock<Output> = OnceLock::new();

struct Output {
    format: LogFormat,
    sink: Arc<Sink>,
}

/// Lines waiting for the writer thread.
#[derive(Default)]
struct Sink {
    pending: Mutex<Pending>,
    wake: Condvar,
}

#[derive(Default)]
struct Pending {
    buf: Vec<u8>,
    /// Lines refused because the buffer was full.
    dropped: u64,
    /// The writer thread sleeps until a line arrives: only then is it woken.
    idle: bool,
    closed: bool,
}

impl Sink {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        crate::sync::lock(&self.pending)
    }

    fn push(&self, line: &[u8]) {
        let mut pending = self.lock();
        if pending.closed {
            drop(pending);
            let _ = std::io::stderr().write_all(line);
            return;
        }
        if pending.buf.len() + line.len() > MAX_PENDING {
            pending.dropped += 1;
            return;
        }
        let was = pending.buf.len();
        pending.buf.extend_from_slice(line);
        if pending.idle || (was < FLUSH_AT && pending.buf.len() >= FLUSH_AT) {
            pending.idle = false;
            self.wake.notify_one();
        }
    }

    /// The writer thread: waits for a line, lets more gather for a tick (or until the
    /// buffer is large), writes them all, until closed and empty.
    fn run(&self) {
        let mut out = Vec::new();
        loop {
            let mut pending = self.lock();
            while pending.buf.is_empty() && pending.dropped == 0 && !pending.closed {
                pending.idle = true;
                pending = crate::sync::wait(&self.wake, pending);
            }
            if !pending.closed && pending.buf.len() < FLUSH_AT {
                pending = crate::sync::wait_timeout(&self.wake, pending, FLUSH_EVERY);
            }
            std::mem::swap(&mut pending.buf, &mut out);
            let dropped = std::mem::take(&mut pending.dropped);
            let closed = pending.closed;
            drop(pending);
            let mut stderr = std::io::stderr().lock();
            let _ = stderr.write_all(&out);
            if dropped > 0 {
                let _ = writeln!(
                    stderr,
                    "line-retry-proxy: {dropped} log lines dropped: stderr did not keep up"
                );
            }
            let _ = stderr.flush();
            drop(stderr);
            out.clear();
            // One burst must not pin its buffer for the life of the process.
            out.shrink_to(FLUSH_AT);
            if closed && self.lock().buf.is_empty() {
                return;
            }
        }
    }
}

/// What tracing's formatters write into: one `write` per event, into the sink.
struct SinkWriter(Arc<Sink>);

impl std::io::Write for SinkWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Writes out every line still buffered when dropped, and stops the writer thread.
/// Held by `main` for the life of the process.
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    writer: Option<JoinHandle<()>>,
}

impl LogGuard {
    /// A guard for a process whose output was set up before: drops to nothing.
    fn none() -> Self {
        LogGuard { writer: None }
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        // Only the guard of the writer it started: a second `init`'s guard leaves the
        // first one's output alone.
        if let Some(writer) = self.writer.take() {
            flush();
            let _ = writer.join();
        }
    }
}

/// Closes the buffer: every line logged so far is written, later ones go straight to
/// stderr. For the last lines of a process, before it exits.
pub fn flush() {
    if let Some(output) = OUTPUT.get() {
        let mut pending = output.sink.lock();
        pending.closed = true;
        output.sink.wake.notify_one();
    }
}

/// Starts logging in `format`, once per process; a second call changes nothing.
pub fn init(format: LogFormat) -> LogGuard {
    let sink = Arc::new(Sink::default());
    if OUTPUT
        .set(Output {
            format,
            sink: sink.clone(),
        })
        .is_err()
    {
        return LogGuard::none();
    }
    let writer = {
        let sink = sink.clone();
        std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || sink.run())
    };
    let writer = match writer {
        Ok(writer) => Some(writer),
        Err(_) => {
            // No thread: every line is written at once instead.
            sink.lock().closed = true;
            None
        }
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour codes only for a person at a terminal: in a pipe or a file they are noise,
    // and they cost formatting time on every line.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(move || SinkWriter(sink.clone()));
    // try_init: an embedding that set its own subscriber keeps it.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    LogGuard { writer }
}

/// One request, as its access line tells it.
pub(crate) struct Access<'a> {
    pub(crate) method: &'a Method,
    pub(crate) path: &'a str,
    /// The endpoint's name, or `other`.
    pub(crate) endpoint: &'static str,
    pub(crate) key: Option<&'a RetryKey>,
    /// The channel the send was keyed under (its bot user ID; not a secret).
    pub(crate) channel: Option<&'a str>,
    /// LINE's `x-line-request-id` of the answer, as the bot got it.
    pub(crate) request_id: Option<&'a str>,
    pub(crate) outcome: &'static str,
    pub(crate) attempts: u32,
    pub(crate) status: u16,
    pub(crate) upstream_status: Option<u16>,
    pub(crate) latency: Duration,
}

/// Writes the access line of one request, if `RUST_LOG` lets it through.
pub(crate) fn access(line: &Access<'_>) {
    if !tracing::enabled!(target: ACCESS_TARGET, tracing::Level::INFO) {
        return;
    }
    let Some(output) = OUTPUT.get() else {
        return;
    };
    thread_local! {
        static LINE: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
    }
    LINE.with(|buf| {
        let Ok(mut buf) = buf.try_borrow_mut() else {
            return;
        };
        buf.clear();
        format_access(&mut buf, output.format, SystemTime::now(), line);
        output.sink.push(buf.as_bytes());
    });
}

/// The access line in the shape tracing's own formatters give an event: a JSON object
/// with the fields at the top level, or `time LEVEL target: key=value …`.
fn format_access(out: &mut String, format: LogFormat, now: SystemTime, a: &Access<'_>) {
    let time = humantime::format_rfc3339_micros(now);
    let latency_ms = a.latency.as_micros() as f64 / 1000.0;
    // Writing into a String cannot fail.
    match format {
        LogFormat::Json => {
            let _ = write!(
                out,
                "{{\"timestamp\":\"{time}\",\"level\":\"INFO\",\"method\":"
            );
            json_str(out, a.method.as_str());
            out.push_str(",\"path\":");
            json_str(out, a.path);
            let _ = write!(out, ",\"endpoint\":\"{}\"", a.endpoint);
            if let Some(key) = a.key {
                out.push_str(",\"key\":");
                json_str(out, &key.to_string());
            }
            if let Some(channel) = a.channel {
                out.push_str(",\"channel\":");
                json_str(out, channel);
            }
            if let Some(id) = a.request_id {
                out.push_str(",\"request_id\":");
                json_str(out, id);
            }
            let _ = write!(
                out,
                ",\"outcome\":\"{}\",\"attempts\":{},\"status\":{}",
                a.outcome, a.attempts, a.status
            );
            if let Some(upstream) = a.upstream_status {
                let _ = write!(out, ",\"upstream_status\":{upstream}");
            }
            let _ = writeln!(
                out,
                ",\"latency_ms\":{latency_ms},\"target\":\"{ACCESS_TARGET}\"}}"
            );
        }
        LogFormat::Text => {
            let _ = write!(
                out,
                "{time}  INFO {ACCESS_TARGET}: method={} path={} endpoint={}",
                a.method, a.path, a.endpoint
            );
            if let Some(key) = a.key {
                let _ = write!(out, " key={key}");
            }
            if let Some(channel) = a.channel {
                let _ = write!(out, " channel={channel}");
            }
            // LINE's ids are UUIDs; anything with a space in it is quoted.
            match a.request_id {
                Some(id) if id.contains(' ') => {
                    let _ = write!(out, " request_id={id:?}");
                }
                Some(id) => {
                    let _ = write!(out, " request_id={id}");
                }
                None => {}
            }
            let _ = write!(
                out,
                " outcome={} attempts={} status={}",
                a.outcome, a.attempts, a.status
            );
            if let Some(upstream) = a.upstream_status {
                let _ = write!(out, " upstream_status={upstream}");
            }
            let _ = writeln!(out, " latency_ms={latency_ms}");
        }
    }
}

/// `s` as a JSON string. Paths and keys are printable ASCII by the time they get here
/// (the HTTP parser saw to it), but a quote or a backslash may still be among them.
fn json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn line(format: LogFormat, key: Option<&RetryKey>, path: &str) -> String {
        let mut out = String::new();
        format_access(
            &mut out,
            format,
            SystemTime::UNIX_EPOCH + Duration::from_micros(1_764_000_000_123_456),
            &Access {
                method: &Method::POST,
                path,
                endpoint: "push",
                key,
                channel: key.map(|_| "U0123456789abcdef0123456789abcdef"),
                request_id: key.map(|_| "0cbd9e6f-2a8f-4e3e-8f1b-3c1f0c5f2a11"),
                outcome: "fresh",
                attempts: 2,
                status: 200,
                upstream_status: Some(200),
                latency: Duration::from_micros(1_250),
            },
        );
        out
    }

    #[test]
    fn json_access_line_is_one_object_with_every_field() {
        let key = RetryKey::Derived(Uuid::nil());
        let text = line(LogFormat::Json, Some(&key), "/v2/bot/message/push");
        assert!(text.ends_with("}\n") && text.matches('\n').count() == 1);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["timestamp"], "2025-11-24T16:00:00.123456Z");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["target"], ACCESS_TARGET);
        assert_eq!(v["method"], "POST");
        assert_eq!(v["path"], "/v2/bot/message/push");
        assert_eq!(v["endpoint"], "push");
        assert_eq!(v["key"], "00000000-0000-0000-0000-000000000000");
        assert_eq!(v["channel"], "U0123456789abcdef0123456789abcdef");
        assert_eq!(v["request_id"], "0cbd9e6f-2a8f-4e3e-8f1b-3c1f0c5f2a11");
        assert_eq!(v["outcome"], "fresh");
        assert_eq!(v["attempts"], 2);
        assert_eq!(v["status"], 200);
        assert_eq!(v["upstream_status"], 200);
        assert_eq!(v["latency_ms"], 1.25);
    }

    #[test]
    fn json_access_line_escapes_what_a_client_may_send() {
        let key = RetryKey::Client(http::HeaderValue::from_static(r#"a"b\c"#));
        let text = line(LogFormat::Json, Some(&key), r#"/v2/"x"\y"#);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["key"], r#"a"b\c"#);
        assert_eq!(v["path"], r#"/v2/"x"\y"#);
        let v: serde_json::Value = serde_json::from_str(&line(LogFormat::Json, None, "/")).unwrap();
        assert!(v.get("key").is_none());
    }

    #[test]
    fn text_access_line_reads_like_an_event() {
        let text = line(LogFormat::Text, None, "/v2/bot/message/push");
        assert_eq!(
            text,
            "2025-11-24T16:00:00.123456Z  INFO line_retry_proxy::access: method=POST \
             path=/v2/bot/message/push endpoint=push outcome=fresh attempts=2 status=200 \
             upstream_status=200 latency_ms=1.25\n"
        );
        let key = RetryKey::Derived(Uuid::nil());
        let text = line(LogFormat::Text, Some(&key), "/v2/bot/message/push");
        assert!(
            text.contains(
                " key=00000000-0000-0000-0000-000000000000 channel=U0123456789abcdef0123456789abcdef \
                 request_id=0cbd9e6f-2a8f-4e3e-8f1b-3c1f0c5f2a11 outcome=fresh"
            ),
            "{text}"
        );
    }

    #[test]
    fn a_full_buffer_drops_and_counts_instead_of_growing() {
        let sink = Sink::default();
        let line = vec![b'x'; 1024 * 1024];
        for _ in 0..10 {
            sink.push(&line);
        }
        let pending = sink.lock();
        assert!(pending.buf.len() <= MAX_PENDING);
        assert_eq!(pending.dropped, 2);
    }
}
