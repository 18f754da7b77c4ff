//! Interrupts: Ctrl-C (SIGINT) and SIGTERM end a build or `kiln run` the
//! same way. CI systems cancel jobs with SIGTERM; both cancel the work in
//! progress, which then cleans up (the step's processes, its snapshot, the
//! lease) before kiln exits.

use tokio::signal::unix::{signal, SignalKind};

/// Resolves when the process receives SIGINT or SIGTERM. If a handler
/// cannot be installed, that signal keeps its default action (the store
/// survives being killed at any point) and only the other one is awaited.
pub async fn interrupted() {
    let int = signal(SignalKind::interrupt());
    let term = signal(SignalKind::terminate());
    match (int, term) {
        (Ok(mut i), Ok(mut t)) => {
            tokio::select! {
                _ = i.recv() => {}
                _ = t.recv() => {}
            }
        }
        (Ok(mut i), Err(_)) => {
            i.recv().await;
        }
        (Err(_), Ok(mut t)) => {
            t.recv().await;
        }
        (Err(_), Err(_)) => std::future::pending::<()>().await,
    }
}

/// Spawns a task that cancels `token` on the first SIGINT or SIGTERM.
pub fn cancel_on_interrupt(token: &kiln_executor::CancellationToken) {
    let c = token.clone();
    tokio::spawn(async move {
        interrupted().await;
        c.cancel();
    });
}
