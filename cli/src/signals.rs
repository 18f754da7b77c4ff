//! Interrupts: Ctrl-C (SIGINT) and SIGTERM cancel a build the same way. CI
//! systems cancel jobs with SIGTERM; both cancel the work in progress,
//! which then cleans up (the step's processes, its snapshot, the lease)
//! before kiln exits.
//!
//! `kiln run` instead passes the signals it receives on to the application
//! ([`forward_to_step`]), as `docker run` does.

use tokio::signal::unix::{signal, SignalKind};

/// Resolves when the process receives SIGINT or SIGTERM. If a handler
/// cannot be installed, that signal keeps its default action (the store
/// survives being killed at any point) and only the other one is awaited.
pub async fn interrupted() {
    first_of(
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    )
    .await
}

/// Waits for the first of two installed signal streams; one that could not
/// be installed is never awaited.
async fn first_of(
    int: std::io::Result<tokio::signal::unix::Signal>,
    term: std::io::Result<tokio::signal::unix::Signal>,
) {
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

/// Set once a build's export has begun ([`exporting`]).
static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Says that the build's export has begun: from now on SIGINT or SIGTERM
/// ends kiln at once (exit [`EXIT_CANCELLED`]) instead of cancelling the
/// solve, which is over. Nothing is lost by that: output files are
/// written under a temporary name and renamed into place, and the store
/// survives a kill at any point (pushes and a `type=local` directory are
/// left as far as they got, as by `kill -9`).
pub fn exporting() {
    EXPORTING.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Spawns a task that cancels `token` on the first SIGINT or SIGTERM (or,
/// once [`exporting`], ends the process).
pub fn cancel_on_interrupt(token: &kiln_solver::session::CancellationToken) {
    let c = token.clone();
    tokio::spawn(async move {
        interrupted().await;
        c.cancel();
        if EXPORTING.load(std::sync::atomic::Ordering::SeqCst) {
            eprintln!("\ninterrupted: the export was stopped");
            std::process::exit(i32::from(EXIT_CANCELLED));
        }
        // A second one ends kiln at once, whatever the build is waiting
        // for (the store survives a kill at any point).
        interrupted().await;
        eprintln!("\ninterrupted again: stopping now");
        std::process::exit(i32::from(EXIT_CANCELLED));
    });
}

/// For commands without a runtime of their own (`kiln pull`, `kiln
/// push`): a token cancelled on the first SIGINT or SIGTERM. The handlers
/// are installed before this returns; the returned runtime watches for
/// them and must live as long as the command.
pub fn cancel_on_interrupt_blocking() -> std::io::Result<(
    kiln_solver::session::CancellationToken,
    tokio::runtime::Runtime,
)> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let token = kiln_solver::session::CancellationToken::new();
    let (int, term) = {
        let _in = rt.enter();
        (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        )
    };
    let c = token.clone();
    rt.spawn(async move {
        first_of(int, term).await;
        c.cancel();
    });
    Ok((token, rt))
}

/// Exit status of a pull or push stopped by SIGINT/SIGTERM (128 + SIGINT,
/// what a shell showed when the signal killed kiln).
pub const EXIT_CANCELLED: u8 = 130;

/// How many SIGINT/SIGTERMs `kiln run` passes on before it kills the
/// container: the third one kills it (docker's CLI gives up on a plugin
/// after the same count).
pub const FORCE_KILL_AFTER: usize = 3;

/// For `kiln run`: every signal in [`kiln_solver::run::FORWARDED_SIGNALS`]
/// that kiln receives is sent into the returned channel (for
/// [`kiln_solver::run::PreparedRun::run`], which passes it to the
/// application), like `docker run --sig-proxy=true`. The application
/// decides what a signal means; one that ignores SIGTERM keeps running.
/// As a way out, the [`FORCE_KILL_AFTER`]th SIGINT or SIGTERM cancels
/// `token` instead (which kills the container; kiln still cleans up).
///
/// With `-t`, `resize` is the master of the application's terminal: on
/// SIGWINCH the window size of kiln's terminal is set on it first (as
/// `docker run -t` does), so that the application reads the new size.
///
/// The handlers are installed before this returns, so that no signal in
/// between takes its default action. Call it inside the runtime.
pub fn forward_to_step(
    token: &kiln_solver::session::CancellationToken,
    resize: Option<crate::run_io::Resizer>,
) -> tokio::sync::mpsc::Receiver<i32> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let (count_tx, mut count_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    for &n in kiln_solver::run::FORWARDED_SIGNALS {
        // A handler that cannot be installed leaves the default action.
        let Ok(mut stream) = signal(SignalKind::from_raw(n)) else {
            continue;
        };
        let tx = tx.clone();
        let count_tx = count_tx.clone();
        let interrupt = n == libc::SIGINT || n == libc::SIGTERM;
        let resize = resize.clone().filter(|_| n == libc::SIGWINCH);
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                if let Some(r) = &resize {
                    r.follow();
                }
                if interrupt {
                    let _ = count_tx.send(());
                }
                if tx.send(n).await.is_err() {
                    break;
                }
            }
        });
    }
    // A resize before the handler was there.
    if let Some(r) = &resize {
        r.follow();
    }
    let c = token.clone();
    tokio::spawn(async move {
        let mut n = 0;
        while count_rx.recv().await.is_some() {
            n += 1;
            if n >= FORCE_KILL_AFTER {
                eprintln!("got {n} SIGTERM/SIGINTs, killing the container");
                c.cancel();
                break;
            }
        }
    });
    rx
}
