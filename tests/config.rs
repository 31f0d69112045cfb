//! The configuration as a running process applies it: on SIGHUP the reloadable
//! settings take effect at once, and every startup-only setting that changed is named
//! in one warning, so none is silently ignored.

mod support;

use std::time::Duration;

use support::mock_line::{Fault, MockLine};
use support::process::Process;
use support::proxy::temp_dir;

fn hangup(proxy: &Process) {
    let pid = proxy.child.id().expect("the proxy runs").to_string();
    let sent = support::output_within(
        std::process::Command::new("kill").args(["-HUP", &pid]),
        Duration::from_secs(10),
        "kill -HUP",
    );
    assert!(sent.status.success(), "SIGHUP sent");
}

/// A changed startup-only setting is named by its key, and not applied; a changed
/// reloadable one in the same file is applied.
#[tokio::test]
async fn sighup_names_every_startup_only_change_and_applies_the_rest() {
    let mock = MockLine::start().await;
    let dir = temp_dir("config-hup");
    let file = dir.join("proxy.toml");
    std::fs::write(&file, "max-attempts = 1\n").expect("write the config file");
    let mut proxy = Process::start(&mock, &[&format!("--config={}", file.display())], &[]).await;

    mock.script([Fault::Status(500)]);
    assert_eq!(
        proxy.push("{\"to\":\"U1\",\"messages\":[]}").await.status,
        http::StatusCode::INTERNAL_SERVER_ERROR,
        "one attempt only before the reload"
    );

    std::fs::write(
        &file,
        "max-attempts = 3\nbody-limit = 1048576\nmax-connections = 100\n",
    )
    .expect("rewrite the config file");
    hangup(&proxy);
    let notice = proxy.wait_for_log("not applied until restart").await;
    let notice = notice.to_string();
    for key in ["body-limit", "max-connections"] {
        assert!(notice.contains(key), "{key} named in: {notice}");
    }
    assert!(
        !notice.contains("max-attempts"),
        "a reloadable setting is not named: {notice}"
    );

    mock.script([Fault::Status(500)]);
    assert_eq!(
        proxy.push("{\"to\":\"U2\",\"messages\":[]}").await.status,
        http::StatusCode::OK,
        "retried under the reloaded max-attempts"
    );
    assert!(proxy.terminate().await, "exits 0 on SIGTERM");
}
