//! Failpoints: named steps of a sync point and of a replica's apply where the fault matrix
//! (`tests/faults.rs`, `scripts/fault-matrix`, docs/RELIABILITY.md) kills the process, fails
//! the step with an I/O error, or holds it while the test cuts the link and looks at the
//! replica.
//!
//! The points are compiled in only with the `failpoints` feature (the `fail` crate), which
//! the test suite turns on; in any other build [`point`] is an empty inline function. A
//! process reads its configuration once, at start, from `FAILPOINTS` (`fail`'s syntax:
//! `NAME=ACTIONS;...`, e.g. `replica.journal.fsync=1*return(kill)`). The argument of `return`
//! says what the point does when it fires:
//!
//! * `kill`: SIGKILL this process (a crash at exactly that step);
//! * `eio`, `enospc`: the step fails with that errno;
//! * `hold`: create the file `$FERRY_FAILPOINT_DIR/NAME` and wait until someone removes it.
//!
//! Every name is listed in [`POINTS`], so that the matrix can check it covers all of them.

use std::io;

/// Every failpoint, with the step it stands before.
pub const POINTS: &[(&str, &str)] = &[
    ("fs.write", "the guest's write to the backing file"),
    (
        "intent.append",
        "the intent log's append of a new extent's mark (before its fdatasync)",
    ),
    (
        "intent.compact",
        "the intent log's rewrite after a committed sync point",
    ),
    (
        "sync.freeze",
        "the sync point's cut, with the dirty set frozen",
    ),
    ("sync.rechunk", "re-chunking the frozen images"),
    ("sync.image.read", "the sync point's read of a frozen image"),
    ("sync.manifest.save", "saving an active manifest"),
    ("sync.frame.send", "sending a data frame to a replica"),
    ("sync.frame.recv", "handling an answer from a replica"),
    ("replica.frame.recv", "handling a frame from the primary"),
    (
        "replica.journal.append",
        "appending a chunk to the staging journal",
    ),
    ("replica.journal.fsync", "the staging journal's fsync"),
    ("replica.commit.record", "writing the commit record"),
    (
        "replica.image.write",
        "writing a chunk into an image in place",
    ),
    ("replica.generation.record", "writing the generation record"),
    (
        "replica.staging.cleanup",
        "clearing the staging journal after the apply",
    ),
    (
        "replica.ack.send",
        "sending the acknowledgement of a committed generation",
    ),
    (
        "replica.settle",
        "fsyncing the images after the acknowledgement",
    ),
];

/// Evaluates the failpoint `name`: `Ok(())` unless it is configured to fire.
#[inline]
pub fn point(name: &str) -> io::Result<()> {
    debug_assert!(
        POINTS.iter().any(|(n, _)| *n == name),
        "unknown failpoint {name}"
    );
    #[cfg(feature = "failpoints")]
    if let Some(r) = fail::eval(name, |arg| fire(name, arg.as_deref().unwrap_or(""))) {
        return r;
    }
    Ok(())
}

/// Reads `FAILPOINTS` (a process calls this once, at start).
pub fn setup() {
    #[cfg(feature = "failpoints")]
    std::mem::forget(fail::FailScenario::setup());
}

#[cfg(feature = "failpoints")]
fn fire(name: &str, action: &str) -> io::Result<()> {
    match action {
        "kill" => {
            log::error!("failpoint {name}: killing this process");
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            unreachable!("SIGKILL returned");
        }
        "eio" => Err(io::Error::from_raw_os_error(libc::EIO)),
        "enospc" => Err(io::Error::from_raw_os_error(libc::ENOSPC)),
        "hold" => {
            let dir = std::env::var_os("FERRY_FAILPOINT_DIR")
                .expect("failpoint hold needs FERRY_FAILPOINT_DIR");
            let flag = std::path::Path::new(&dir).join(name);
            std::fs::write(&flag, std::process::id().to_string())?;
            log::warn!(
                "failpoint {name}: holding until {} is removed",
                flag.display()
            );
            while flag.exists() {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Ok(())
        }
        other => panic!("failpoint {name}: unknown action return({other})"),
    }
}
