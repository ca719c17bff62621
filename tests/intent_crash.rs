//! The intent log under a real process kill: a child process (this test binary again, running
//! only `child_marks_until_killed`) marks extents from several threads, prints each mark once
//! `mark` has returned, and is killed with SIGKILL while appends are in flight. The parent
//! reopens the log and must find every acknowledged mark. Three rounds on the same log also
//! check that recovered extents stay marked across a second and third crash.

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ferry::dirty::{FILE_NAME, IntentLog};

/// Set in the child's environment: the state directory to use.
const CHILD_ENV: &str = "FERRY_INTENT_CRASH_DIR";
const ES: u64 = 64 * 1024;
const THREADS: u64 = 6;
/// The child kills itself once this many marks are acknowledged.
const KILL_AFTER: usize = 400;

/// Runs only as the child (with `CHILD_ENV` set); otherwise it does nothing.
#[test]
fn child_marks_until_killed() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let round: u64 = std::env::var("FERRY_INTENT_CRASH_ROUND")
        .unwrap()
        .parse()
        .unwrap();
    let (log, _) = IntentLog::open(&Path::new(&dir).join(FILE_NAME), ES).unwrap();
    let log = Arc::new(log);
    let acked = Arc::new(AtomicUsize::new(0));
    for t in 0..THREADS {
        let (log, acked) = (log.clone(), acked.clone());
        std::thread::spawn(move || {
            let image = PathBuf::from(format!("vm{t}/disk.img"));
            let mut x = round * 1000 + t + 1;
            loop {
                // Pseudo-random extents: some new (an append), some repeated (the fast path).
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let extent = x % 5000;
                let offset = extent * ES + x % ES;
                log.mark(&image, offset..offset + 4096).unwrap();
                // One write(2) per line: once printed, the parent sees it even after the kill.
                println!("ack {} {offset}", image.display());
                acked.fetch_add(1, Ordering::SeqCst);
            }
        });
    }
    while acked.load(Ordering::SeqCst) < KILL_AFTER {
        std::thread::sleep(Duration::from_micros(200));
    }
    // SAFETY: plain libc calls; the process ends here.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    unreachable!("SIGKILL did not stop the process");
}

#[test]
fn acknowledged_marks_survive_sigkill() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut acks: Vec<(PathBuf, u64)> = Vec::new();
    for round in 0..3 {
        let new = run_child(dir.path(), round);
        assert!(
            new.len() >= KILL_AFTER,
            "round {round}: only {} acks",
            new.len()
        );
        acks.extend(new);

        let (log, rec) = IntentLog::open(&dir.path().join(FILE_NAME), ES).unwrap();
        assert!(
            !rec.clean,
            "round {round}: a killed run must recover as unclean"
        );
        for (image, offset) in &acks {
            let set = rec
                .dirty
                .get(image)
                .unwrap_or_else(|| panic!("round {round}: {} not recovered", image.display()));
            assert!(
                set.contains_range(*offset..offset + 4096),
                "round {round}: acknowledged mark of {} at {offset} lost",
                image.display()
            );
        }
        // Nothing beyond what was marked: every recovered extent holds an acknowledged mark or
        // one being marked at a kill (each thread has at most one mark, of at most two extents,
        // unacknowledged when it dies; such marks pile up over the rounds).
        let acked_extents: std::collections::BTreeSet<_> = acks
            .iter()
            .flat_map(|(i, o)| (o / ES..=(o + 4095) / ES).map(move |e| (i.clone(), e)))
            .collect();
        let recovered: u64 = rec.dirty.values().map(|s| s.covered_bytes() / ES).sum();
        assert!(
            recovered <= acked_extents.len() as u64 + (round + 1) * 2 * THREADS,
            "round {round}: {recovered} extents recovered, {} acknowledged",
            acked_extents.len()
        );
        drop(log);
    }
}

/// Runs the child for one round and returns the marks it acknowledged before it was killed.
fn run_child(dir: &Path, round: u64) -> Vec<(PathBuf, u64)> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_marks_until_killed",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, dir)
        .env("FERRY_INTENT_CRASH_ROUND", round.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).unwrap();
        s
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("round {round}: the child did not finish in time (deadlock?)");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = reader.join().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "round {round}: the child ended with {status}, not SIGKILL\n{err}"
    );
    out.lines()
        // libtest's "test child_marks_until_killed ... " has no newline: the first ack
        // follows it on the same line.
        .filter_map(|l| l.find("ack ").map(|i| &l[i + 4..]))
        .map(|l| {
            let (image, offset) = l.rsplit_once(' ').unwrap();
            (PathBuf::from(image), offset.parse().unwrap())
        })
        .collect()
}
