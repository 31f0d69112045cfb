//! `line-retry-proxy demo`: what the proxy does for a bot, with no LINE account and
//! nothing sent off the machine.
//!
//! A legacy bot ([`bot`]) pushes messages and resends on errors. It runs twice against
//! a fake LINE on loopback ([`fake_line`]) that fails the same requests in both runs:
//! once straight to it, once through the real proxy (the [`App`] that `serve` runs, on
//! 127.0.0.1:0, base-URL mode). Then a table says what users would have received.
//!
//! Like `main`, this is a composition root: it starts the app, and nothing imports it.

pub(crate) mod bot;
pub(crate) mod fake_line;
mod table;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use crate::app::{self, App, StartError};
use crate::config::{Config, ConfigError, LogFormat, ServeArgs};
use crate::domain::Outcome;
use bot::{Behaviour, BotReport};
use fake_line::{FakeLine, Tally};

/// The bot's channel credential: any non-empty token will do for the fake.
const TOKEN: &str = "Bearer demo-channel-token";
/// How long the fake holds the answer of an accepted-then-timeout request: longer
/// than the bot or the proxy waits, so they always give up first.
const FAKE_HANG: Duration = Duration::from_secs(5);
/// Every timing of the demo, the bot's and the proxy's, is the real one divided by
/// this, so that a run takes seconds and the timings keep their proportions.
const TIME_SCALE: u32 = 25;

fn scaled(real: Duration) -> String {
    humantime::format_duration(real / TIME_SCALE).to_string()
}

/// One run, from start to drained, must end within this, or the demo fails.
const RUN_LIMIT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Messages the bot pushes in each run
    #[arg(long, value_name = "N", default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=5000))]
    pub(crate) sends: u32,
    /// Seed of the fake LINE's faults and the bot's pauses: the same seed, the same faults
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub(crate) seed: u64,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum DemoError {
    #[error("demo proxy config: {0}")]
    Config(#[from] ConfigError),
    #[error("demo proxy: {0}")]
    Start(#[from] StartError),
    #[error("demo: {0}")]
    Io(#[from] std::io::Error),
    #[error("demo: the {0} run did not finish within {RUN_LIMIT:?}")]
    TooSlow(&'static str),
    #[error("demo: the proxy did not finish its work within its shutdown grace")]
    NotDrained,
}

/// The subcommand: runs the demo, prints the table, and exits 0 only if the proxied
/// run delivered every message exactly once.
pub fn main(args: &DemoArgs) -> ExitCode {
    // The proxy's own log lines would bury the table: shown only when asked for.
    let _log = std::env::var_os("RUST_LOG")
        .is_some()
        .then(|| crate::telemetry::init(LogFormat::Text));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("line-retry-proxy: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(report) => {
            print!("{}", report.render());
            if report.proxied_is_exact() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(err) => {
            eprintln!("line-retry-proxy: {err}");
            ExitCode::FAILURE
        }
    }
}

/// One run: what the bot saw, what LINE saw, and (through the proxy) how it answered.
#[derive(Debug, Default)]
pub(crate) struct RunReport {
    pub(crate) bot: BotReport,
    pub(crate) line: Tally,
    /// Messages delivered at least once.
    pub(crate) delivered: usize,
    /// Deliveries beyond the first of each message.
    pub(crate) duplicates: usize,
    /// Messages never delivered.
    pub(crate) lost: usize,
    /// Messages the bot gave up on that were delivered all the same.
    pub(crate) gave_up_delivered: usize,
    /// The proxy's answers by outcome, and its retries (from its metrics).
    pub(crate) proxy: Option<ProxyCounts>,
}

#[derive(Debug, Default)]
pub(crate) struct ProxyCounts {
    pub(crate) outcomes: Vec<(Outcome, u64)>,
    pub(crate) retries: u64,
    /// The proxy's retry settings, as the header of the output names them.
    pub(crate) settings: String,
}

pub(crate) struct Report {
    pub(crate) sends: usize,
    pub(crate) seed: u64,
    pub(crate) behaviour: Behaviour,
    pub(crate) bare: RunReport,
    pub(crate) proxied: RunReport,
}

pub(crate) async fn run(args: &DemoArgs) -> Result<Report, DemoError> {
    let bodies: Arc<Vec<String>> = Arc::new(
        (0..args.sends)
            .map(|i| {
                serde_json::json!({
                    "to": format!("U{:032x}", u64::from(i) + 1),
                    "messages": [{"type": "text", "text": format!("demo message {i} (seed {})", args.seed)}],
                })
                .to_string()
            })
            .collect(),
    );
    let behaviour = Behaviour {
        tries: 4,
        // The legacy Python SDK's default timeout, 5 s.
        timeout: Duration::from_secs(5) / TIME_SCALE,
        // A random pause of up to 10 s before each resend.
        max_pause: Duration::from_secs(10) / TIME_SCALE,
        workers: 8,
        seed: args.seed,
    };

    let bare = tokio::time::timeout(RUN_LIMIT, async {
        let line = FakeLine::start(args.seed, FAKE_HANG).await?;
        let bot = bot::run(&line.url(), TOKEN, bodies.clone(), behaviour.clone()).await;
        let tally = line.stop(Duration::from_secs(5)).await;
        Ok::<_, DemoError>(RunReport::new(bot, tally, &bodies, None))
    })
    .await
    .map_err(|_| DemoError::TooSlow("bare"))??;

    let proxied = tokio::time::timeout(RUN_LIMIT, proxied_run(args.seed, &bodies, &behaviour))
        .await
        .map_err(|_| DemoError::TooSlow("proxied"))??;

    Ok(Report {
        sends: bodies.len(),
        seed: args.seed,
        behaviour,
        bare,
        proxied,
    })
}

/// The same bot, the same faults, through the real proxy.
async fn proxied_run(
    seed: u64,
    bodies: &Arc<Vec<String>>,
    behaviour: &Behaviour,
) -> Result<RunReport, DemoError> {
    let line = FakeLine::start(seed, FAKE_HANG).await?;
    let ca_dir = TempDir::new()?;
    // The defaults with every timing divided by TIME_SCALE, as the bot's are (so the
    // demo takes seconds), and a retry budget that admits the fake's failure rate
    // (LINE fails far less than a quarter of requests).
    let serve = ServeArgs {
        listen: Some("127.0.0.1:0".into()),
        admin_listen: Some("127.0.0.1:0".into()),
        upstream: Some(line.url()),
        ca_dir: Some(ca_dir.0.clone()),
        store: Some("memory".into()),
        attempt_timeout: Some(scaled(Duration::from_secs(10))),
        retry_base_delay: Some(scaled(Duration::from_millis(200))),
        retry_max_delay: Some(scaled(Duration::from_secs(5))),
        request_deadline: Some(scaled(Duration::from_secs(45))),
        retry_budget_min_per_second: Some("1000".into()),
        shutdown_grace: Some("5s".into()),
        ..ServeArgs::default()
    };
    let config = Config::load(&serve)?;
    let retry = &config.policy.retry;
    let settings = format!(
        "attempt-timeout {}, max-attempts {},\nrequest-deadline {}",
        humantime::format_duration(retry.attempt_timeout),
        retry.max_attempts,
        humantime::format_duration(retry.deadline),
    );
    let app = App::new(config)?;
    let (listener, admin) = app::bind(&app.config).await?;
    let base = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(app::run(app.clone(), listener, admin, async move {
        let _ = stopped.await;
    }));

    let bot = bot::run(&base, TOKEN, bodies.clone(), behaviour.clone()).await;
    // Stopping drains the work the bot left behind (sends it gave up on that the
    // proxy still finishes), so the counts below are final.
    let _ = stop.send(());
    if !matches!(running.await, Ok(true)) {
        return Err(DemoError::NotDrained);
    }
    let metrics = app.edge.render_metrics().await;
    let tally = line.stop(Duration::from_secs(5)).await;
    Ok(RunReport::new(
        bot,
        tally,
        bodies,
        Some(ProxyCounts::from_metrics(&metrics, settings)),
    ))
}

impl RunReport {
    fn new(bot: BotReport, line: Tally, bodies: &[String], proxy: Option<ProxyCounts>) -> Self {
        let mut delivered = 0;
        let mut duplicates = 0;
        for body in bodies {
            match line.deliveries.get(body.as_bytes()).copied().unwrap_or(0) {
                0 => {}
                n => {
                    delivered += 1;
                    duplicates += n - 1;
                }
            }
        }
        let delivered_at = |i: &usize| {
            bodies
                .get(*i)
                .and_then(|b| line.deliveries.get(b.as_bytes()))
                .is_some_and(|&n| n > 0)
        };
        let gave_up_delivered = bot.gave_up.iter().filter(|i| delivered_at(i)).count();
        RunReport {
            bot,
            gave_up_delivered,
            delivered,
            duplicates,
            lost: bodies.len() - delivered,
            line,
            proxy,
        }
    }
}

impl ProxyCounts {
    /// Push's answers by outcome and the retries, from the metrics text.
    fn from_metrics(text: &str, settings: String) -> Self {
        let value = |series: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or(0)
        };
        let outcomes = Outcome::ALL
            .into_iter()
            .filter(|o| *o != Outcome::Passthrough)
            .map(|o| {
                let series = format!(
                    "line_retry_proxy_requests_total{{endpoint=\"push\",outcome=\"{}\"}}",
                    o.label()
                );
                (o, value(&series))
            })
            .collect();
        let retries = text
            .lines()
            .filter(|l| l.starts_with("line_retry_proxy_retries_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        ProxyCounts {
            outcomes,
            retries,
            settings,
        }
    }
}

/// A private directory for the proxy's intercept CA, removed when the demo ends.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> std::io::Result<TempDir> {
        use std::os::unix::fs::DirBuilderExt;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let path = std::env::temp_dir().join(format!(
            "line-retry-proxy-demo-{}-{nanos}",
            std::process::id()
        ));
        std::fs::DirBuilder::new().mode(0o700).create(&path)?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
