//! Tests of the intent log: crash recovery (a dropped log is a crash), torn tails, clean
//! close, sync epochs, renames, fault injection (full disk, failed fdatasync), group commit.

#![allow(clippy::single_range_in_vec_init)] // one dirty range is the common case

use super::*;
use std::time::{Duration, Instant};

/// Fault injection and counters for the log file.
#[derive(Default)]
pub(super) struct Hooks {
    /// The next append writes this many bytes, then fails with ENOSPC.
    pub fail_write: Option<usize>,
    /// The next fdatasync fails with EIO.
    pub fail_sync: bool,
    /// How long each fdatasync takes on top of the real one.
    pub sync_delay: Duration,
    /// fdatasync calls made by appends.
    pub syncs: u64,
}

const MIB: u64 = 1 << 20;
const ES: u64 = 4 * MIB;

fn p(s: &str) -> &Path {
    Path::new(s)
}

/// A log whose commits forget their marks at once (no lingering: the tests below that do not
/// name a linger check what a commit forgets).
fn open(path: &Path) -> (IntentLog, Recovery) {
    open_lingering(path, Duration::ZERO)
}

fn open_lingering(path: &Path, linger: Duration) -> (IntentLog, Recovery) {
    open_hot(path, linger, 0)
}

/// A log whose committed marks linger for `linger`, and past it while they fit in `hot` extents.
fn open_hot(path: &Path, linger: Duration, hot: u64) -> (IntentLog, Recovery) {
    let (log, rec) = IntentLog::open(path, ES).unwrap();
    (log.lingering(linger).hot(hot * ES), rec)
}

/// Begins and commits a sync `secs` after `start` (nothing written in it but what is live).
fn commit_at(log: &IntentLog, start: Instant, secs: u64) {
    log.commit_sync_at(log.begin_sync(), start + Duration::from_secs(secs))
        .unwrap();
}

fn dirty_of(r: &Recovery) -> Vec<(String, Vec<Range<u64>>)> {
    r.dirty
        .iter()
        .map(|(k, v)| (k.display().to_string(), v.to_vec()))
        .collect()
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

#[test]
fn intent_log_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<IntentLog>();
}

#[test]
fn a_missing_file_is_a_clean_first_mount() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    let (log, rec) = open(&path);
    assert!(rec.clean);
    assert!(rec.dirty.is_empty());
    assert_eq!(log.marked_extents(), 0);
    assert!(path.exists());
    drop(log);
    let (_, rec) = open(&path);
    assert!(!rec.clean, "a run that never closed is unclean");
    assert!(rec.dirty.is_empty());
}

#[test]
fn marks_survive_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    let (log, _) = open(&path);
    log.mark(p("vm/a.img"), 100..200).unwrap();
    log.mark(p("vm/a.img"), ES - 1..ES + 1).unwrap(); // straddles extents 0 and 1
    log.mark(p("b.img"), 10 * ES..10 * ES + 1).unwrap();
    log.mark(p("b.img"), 5..5).unwrap(); // empty: nothing
    assert_eq!(log.marked_extents(), 3);
    drop(log); // no close: a crash
    let (log, rec) = open(&path);
    assert!(!rec.clean);
    assert_eq!(
        dirty_of(&rec),
        vec![
            ("b.img".into(), vec![10 * ES..11 * ES]),
            ("vm/a.img".into(), vec![0..2 * ES]),
        ]
    );
    // They stay marked after the reopen: a second crash recovers them again.
    assert_eq!(log.marked_extents(), 3);
    drop(log);
    let (_, again) = open(&path);
    assert_eq!(again, rec);
}

#[test]
fn marking_an_extent_twice_writes_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    let (log, _) = open(&path);
    log.mark(p("a"), 0..4096).unwrap();
    let len = file_len(&path);
    for i in 0..100 {
        log.mark(p("a"), i * 4096..(i + 1) * 4096).unwrap();
    }
    assert_eq!(file_len(&path), len);
    assert_eq!(log.file.lock().test.syncs, 1);
}

/// A log at `path` with marks for a (extent 0), b (extent 1) and c (extent 0), one record each.
fn three_marks(path: &Path) {
    let (log, _) = open(path);
    log.mark(p("a"), 0..1).unwrap();
    log.mark(p("b"), ES..ES + 1).unwrap();
    log.mark(p("c"), 0..1).unwrap();
}

#[test]
fn a_torn_tail_is_ignored_and_the_valid_prefix_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    three_marks(&path);
    // Cut the last record short and add garbage, as a crash mid-append could leave.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.truncate(bytes.len() - 3);
    bytes.extend_from_slice(b"\x13\x37garbage after the crash");
    std::fs::write(&path, &bytes).unwrap();
    let (log, rec) = open(&path);
    assert!(!rec.clean);
    assert_eq!(
        dirty_of(&rec),
        vec![("a".into(), vec![0..ES]), ("b".into(), vec![ES..2 * ES])]
    );
    // The reopen rewrote the log without the tail: appends after it are readable.
    log.mark(p("d"), 0..1).unwrap();
    drop(log);
    let (_, rec) = open(&path);
    assert_eq!(rec.dirty.len(), 3);
    assert!(rec.dirty.contains_key(p("d")));
}

#[test]
fn a_damaged_record_before_intact_ones_is_corruption_not_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    three_marks(&path);
    // One flipped bit in the first record's image name ("a").
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.iter().rposition(|&c| c == b'a').unwrap();
    assert!(at < bytes.len() / 2, "the first record's name");
    bytes[at] ^= 0x04;
    std::fs::write(&path, &bytes).unwrap();
    let e = IntentLog::open(&path, ES).unwrap_err();
    assert!(matches!(e, IntentError::Corrupt { .. }), "{e}");
    assert!(
        e.to_string().contains("damage, not a write cut short"),
        "{e}"
    );
}

#[test]
fn every_cut_of_the_log_opens_with_a_prefix_of_the_marks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    let (log, _) = open(&path);
    for i in 0..5 {
        log.mark(p("img"), i * 2 * ES..i * 2 * ES + 1).unwrap();
    }
    drop(log);
    let full = std::fs::read(&path).unwrap();
    let mut seen = Vec::new();
    for len in format::HEADER_LEN..=full.len() {
        std::fs::write(&path, &full[..len]).unwrap();
        let (_, rec) = open(&path);
        let got = rec
            .dirty
            .get(p("img"))
            .map(|s| s.to_vec())
            .unwrap_or_default();
        // Marks are recovered in order, without gaps.
        let expect: Vec<_> = (0..got.len() as u64)
            .map(|i| i * 2 * ES..(i * 2 + 1) * ES)
            .collect();
        assert_eq!(got, expect, "cut at {len}");
        seen.push(got.len());
    }
    assert_eq!(seen.last(), Some(&5));
}

#[test]
fn a_clean_close_gives_the_exact_ranges_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    let (log, _) = open(&path);
    log.mark(p("a"), 10..20).unwrap();
    log.mark(p("a"), 3 * ES..3 * ES + 7).unwrap();
    let mut dirty = BTreeMap::new();
    dirty.insert(
        PathBuf::from("a"),
        [10..20, 3 * ES..3 * ES + 7]
            .into_iter()
            .collect::<RangeSet>(),
    );
    dirty.insert(PathBuf::from("empty"), RangeSet::new());
    log.close_clean(&dirty).unwrap();
    let e = log.mark(p("a"), 9 * ES..9 * ES + 1).unwrap_err();
    assert!(matches!(e, IntentError::Closed { .. }), "{e}");
    drop(log);
    let (log, rec) = open(&path);
    assert!(rec.clean);
    assert_eq!(
        dirty_of(&rec),
        vec![("a".into(), vec![10..20, 3 * ES..3 * ES + 7])]
    );
    // After the open they are marked again (as extents): a crash now recovers them.
    assert_eq!(log.marked_extents(), 2);
    drop(log);
    let (_, rec) = open(&path);
    assert!(!rec.clean);
    assert_eq!(
        dirty_of(&rec),
        vec![("a".into(), vec![0..ES, 3 * ES..4 * ES])]
    );
}

#[test]
fn a_sync_commit_forgets_its_marks_and_compacts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    let (log, _) = open(&path);
    for i in 0..50 {
        log.mark(p("a"), i * 2 * ES..i * 2 * ES + 1).unwrap();
    }
    let t = log.begin_sync();
    // After the freeze the same extent is marked again, without a new record: the frozen
    // mark is in the file until the compaction, which writes the new one.
    let before = file_len(&path);
    log.mark(p("a"), 0..1).unwrap();
    assert_eq!(file_len(&path), before);
    log.mark(p("b"), 0..1).unwrap();
    assert!(file_len(&path) > before);
    assert_eq!(log.marked_extents(), 51);
    log.commit_sync(t).unwrap();
    assert_eq!(log.marked_extents(), 2);
    let compacted = file_len(&path);
    assert!(compacted < before, "{compacted} >= {before}");
    drop(log);
    let (_, rec) = open(&path);
    assert_eq!(
        dirty_of(&rec),
        vec![("a".into(), vec![0..ES]), ("b".into(), vec![0..ES])]
    );
}

#[test]
fn a_committed_sync_s_marks_linger_and_a_write_there_needs_no_append() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    let linger = Duration::from_secs(10);
    let (log, _) = open_lingering(&path, linger);
    let start = Instant::now();
    let at = |s: u64| start + Duration::from_secs(s);
    log.mark(p("a"), 0..1).unwrap();
    log.mark(p("b"), 0..1).unwrap();
    let t = log.begin_sync();
    log.commit_sync_at(t, at(0)).unwrap();
    // Not live any more, but still in the file: writing there again is the fast path.
    assert_eq!(log.marked_extents(), 0);
    let len = file_len(&path);
    log.mark(p("a"), 5..6).unwrap();
    let t = log.begin_sync();
    log.mark(p("b"), 9..10).unwrap();
    assert_eq!(file_len(&path), len);
    assert_eq!(log.marked_extents(), 2, "a in the sync, b since");
    // Half the linger on, a commit moves the lingering marks to the old period; half again,
    // the next one forgets them and compacts the file. `b`, written again while lingering (no
    // append), is in the new file all the same: it went on lingering from its own sync.
    log.commit_sync_at(t, at(6)).unwrap();
    let t = log.begin_sync();
    log.mark(p("c"), 0..1).unwrap();
    let before = file_len(&path);
    log.commit_sync_at(t, at(12)).unwrap();
    assert!(file_len(&path) < before, "compacted");
    drop(log);
    let (log, rec) = open_lingering(&path, linger);
    assert_eq!(
        dirty_of(&rec),
        vec![("b".into(), vec![0..ES]), ("c".into(), vec![0..ES])]
    );
    // A write to the forgotten extent appends a mark again.
    let len = file_len(&path);
    log.mark(p("a"), 0..1).unwrap();
    assert!(file_len(&path) > len);
}

#[test]
fn a_quiet_spell_forgets_no_marks_that_fit_the_hot_limit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    let (log, _) = open_hot(&path, Duration::from_secs(10), 3);
    let start = Instant::now();
    let commit = |log: &IntentLog, s| commit_at(log, start, s);
    log.mark(p("a"), 0..1).unwrap();
    log.mark(p("b"), 0..1).unwrap();
    commit(&log, 0);
    // A minute of sync points with nothing written: the linger is long over, but two extents
    // fit the limit of three, so they stay marked and a guest coming back to them needs no
    // append (and no fdatasync).
    for s in (6..=60).step_by(6) {
        commit(&log, s);
    }
    let len = file_len(&path);
    log.mark(p("a"), 0..1).unwrap();
    log.mark(p("b"), ES - 1..ES).unwrap();
    assert_eq!(file_len(&path), len, "no append for the hot extents");
    commit(&log, 66);
    // Two new extents take the hot marks past the limit once the linger leaves them behind:
    // the older ones go (a and b, last written at 60 s), the newer ones (c, d) stay.
    log.mark(p("c"), 0..1).unwrap();
    log.mark(p("d"), 0..1).unwrap();
    commit(&log, 72);
    let before = file_len(&path);
    for s in (78..=120).step_by(6) {
        commit(&log, s);
    }
    assert!(file_len(&path) < before, "compacted");
    drop(log);
    let (log, rec) = open_hot(&path, Duration::from_secs(10), 3);
    assert_eq!(
        dirty_of(&rec),
        vec![("c".into(), vec![0..ES]), ("d".into(), vec![0..ES])]
    );
    let len = file_len(&path);
    log.mark(p("a"), 0..1).unwrap();
    assert!(
        file_len(&path) > len,
        "a forgotten extent is appended again"
    );
}

#[test]
fn marks_leaving_the_linger_beyond_the_hot_limit_are_all_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    let (log, _) = open_hot(&path, Duration::from_secs(10), 1);
    let start = Instant::now();
    log.mark(p("a"), 0..1).unwrap();
    log.mark(p("b"), 0..1).unwrap();
    // Past the linger: two extents do not fit a limit of one, so neither stays hot.
    for s in [0, 6, 12] {
        commit_at(&log, start, s);
    }
    assert_eq!(log.logged_bytes(), 0);
    drop(log);
    let (_, rec) = open(&path);
    assert_eq!(dirty_of(&rec), vec![]);
}

#[test]
fn with_no_linger_a_commit_forgets_its_marks_whatever_the_hot_limit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    let (log, _) = open_hot(&path, Duration::ZERO, 3);
    log.mark(p("a"), 0..1).unwrap();
    log.commit_sync(log.begin_sync()).unwrap();
    let len = file_len(&path);
    log.mark(p("a"), 0..1).unwrap();
    assert!(file_len(&path) > len, "appended again");
    drop(log);
    let (_, rec) = open(&path);
    assert_eq!(dirty_of(&rec), vec![("a".into(), vec![0..ES])]);
}

#[test]
fn a_crash_after_a_commit_recovers_the_lingering_marks_too() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    let (log, _) = open_lingering(&path, Duration::from_secs(3600));
    log.mark(p("a"), 0..1).unwrap();
    let t = log.begin_sync();
    log.mark(p("b"), 0..1).unwrap();
    log.commit_sync(t).unwrap();
    // A failed fdatasync makes the next append rewrite the whole log: the rewrite keeps the
    // lingering mark, which a later write to `a` trusts without an append.
    log.file.lock().test.fail_sync = true;
    assert!(log.mark(p("c"), 0..1).is_err());
    log.mark(p("c"), 0..1).unwrap();
    log.mark(p("a"), 7..8).unwrap();
    drop(log);
    let (_, rec) = open(&path);
    assert_eq!(
        dirty_of(&rec),
        vec![
            ("a".into(), vec![0..ES]),
            ("b".into(), vec![0..ES]),
            ("c".into(), vec![0..ES])
        ]
    );
}

#[test]
fn an_aborted_sync_keeps_its_marks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    let (log, _) = open(&path);
    log.mark(p("a"), 0..1).unwrap();
    let t = log.begin_sync();
    log.mark(p("a"), ES..ES + 1).unwrap();
    log.abort_sync(t);
    // Marked again in the current epoch: the fast path, no I/O.
    let len = file_len(&path);
    log.mark(p("a"), 0..1).unwrap();
    assert_eq!(file_len(&path), len);
    // A later sync that commits forgets both.
    let t = log.begin_sync();
    log.commit_sync(t).unwrap();
    assert_eq!(log.marked_extents(), 0);
    drop(log);
    let (_, rec) = open(&path);
    assert!(rec.dirty.is_empty());
}

#[test]
fn overlapping_syncs_forget_only_their_own_marks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    let (log, _) = open(&path);
    log.mark(p("a"), 0..1).unwrap();
    let t1 = log.begin_sync();
    log.mark(p("a"), ES..ES + 1).unwrap();
    let t2 = log.begin_sync();
    log.commit_sync(t1).unwrap();
    drop(log);
    let (_, rec) = open(&path);
    assert_eq!(dirty_of(&rec), vec![("a".into(), vec![ES..2 * ES])]);
    drop(t2);
}

#[test]
fn marks_follow_a_rename() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    let (log, _) = open(&path);
    log.mark(p("old.img"), 0..1).unwrap();
    let t = log.begin_sync();
    log.mark(p("old.img"), ES..ES + 1).unwrap();
    log.mark(p("dir/x.img"), 0..1).unwrap();
    log.mark(p("dir/y.img"), 0..1).unwrap();
    log.mark(p("dirx.img"), 0..1).unwrap();
    log.rename(p("old.img"), p("new.img")).unwrap();
    log.rename(p("dir"), p("moved")).unwrap();
    // Under the new name the extents are marked: no new record.
    let len = file_len(&path);
    log.mark(p("new.img"), ES..ES + 1).unwrap();
    log.mark(p("moved/x.img"), 5..6).unwrap();
    assert_eq!(file_len(&path), len);
    // A write to a new image at the old name marks afresh.
    log.mark(p("old.img"), 0..1).unwrap();
    assert!(file_len(&path) > len);
    // Crash before the sync commits: everything is found under the new names.
    drop(t);
    drop(log);
    let (log, rec) = open(&path);
    let names: Vec<_> = dirty_of(&rec).into_iter().map(|(k, _)| k).collect();
    assert!(names.contains(&"new.img".to_string()), "{names:?}");
    assert!(names.contains(&"moved/x.img".to_string()), "{names:?}");
    assert!(names.contains(&"moved/y.img".to_string()), "{names:?}");
    assert!(names.contains(&"dirx.img".to_string()), "{names:?}");
    assert_eq!(rec.dirty[p("new.img")].to_vec(), vec![0..2 * ES]);
    drop(log);
}

#[test]
fn a_rename_during_a_sync_keeps_each_mark_in_its_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    let (log, _) = open(&path);
    log.mark(p("a"), 0..1).unwrap();
    let t = log.begin_sync();
    log.mark(p("a"), ES..ES + 1).unwrap();
    log.rename(p("a"), p("b")).unwrap();
    log.commit_sync(t).unwrap();
    // The frozen mark went with the sync; the later one stays, under the new name.
    assert_eq!(log.marked_extents(), 1);
    drop(log);
    let (_, rec) = open(&path);
    assert_eq!(dirty_of(&rec), vec![("b".into(), vec![ES..2 * ES])]);
}

#[test]
fn a_full_disk_fails_the_mark_and_leaves_the_log_readable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    let (log, _) = open(&path);
    log.mark(p("a"), 0..1).unwrap();
    log.file.lock().test.fail_write = Some(7); // a partial record, then ENOSPC
    let e = log.mark(p("b"), 0..1).unwrap_err();
    assert_eq!(e.errno(), libc::ENOSPC, "{e}");
    assert!(e.to_string().contains(FILE_NAME), "{e}");
    // The failed mark is not taken as done: the next try writes it.
    log.mark(p("b"), 0..1).unwrap();
    log.mark(p("c"), 0..1).unwrap();
    drop(log);
    let (_, rec) = open(&path);
    let names: Vec<_> = dirty_of(&rec).into_iter().map(|(k, _)| k).collect();
    assert_eq!(names, vec!["a", "b", "c"]);
}

#[test]
fn a_failed_fdatasync_makes_the_next_mark_rewrite_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    let (log, _) = open(&path);
    log.mark(p("a"), 0..1).unwrap();
    log.file.lock().test.fail_sync = true;
    let e = log.mark(p("b"), 0..1).unwrap_err();
    assert_eq!(e.errno(), libc::EIO);
    assert!(log.file.lock().file.is_none());
    log.mark(p("c"), 0..1).unwrap();
    assert!(log.file.lock().file.is_some());
    let len = file_len(&path);
    log.mark(p("d"), 0..1).unwrap(); // back to appending
    assert!(file_len(&path) > len);
    drop(log);
    let (_, rec) = open(&path);
    let names: Vec<_> = dirty_of(&rec).into_iter().map(|(k, _)| k).collect();
    // "b" may or may not be on disk (its fdatasync failed); the others must be.
    for n in ["a", "c", "d"] {
        assert!(names.contains(&n.to_string()), "{names:?}");
    }
}

#[test]
fn concurrent_first_writes_share_an_fdatasync() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    let (log, _) = open(&path);
    log.file.lock().test.sync_delay = Duration::from_millis(100);
    const THREADS: u64 = 8;
    let barrier = std::sync::Barrier::new(THREADS as usize);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (log, barrier) = (&log, &barrier);
            s.spawn(move || {
                barrier.wait();
                log.mark(p("img"), t * ES..t * ES + 1).unwrap();
            });
        }
    });
    let syncs = log.file.lock().test.syncs;
    assert!(syncs < THREADS, "{syncs} fdatasyncs for {THREADS} marks");
    assert_eq!(log.marked_extents(), THREADS as usize);
    drop(log);
    let (_, rec) = open(&path);
    assert_eq!(rec.dirty[p("img")].to_vec(), vec![0..THREADS * ES]);
}

#[test]
fn writers_of_the_same_new_extent_wait_for_one_append() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    let (log, _) = open(&path);
    log.file.lock().test.sync_delay = Duration::from_millis(50);
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let log = &log;
            s.spawn(move || log.mark(p("img"), t * 4096..(t + 1) * 4096).unwrap());
        }
    });
    // The first append writes extent 0; the others find it in flight and wait for it (or,
    // coming later, find it marked).
    assert_eq!(log.file.lock().test.syncs, 1);
}

#[test]
fn the_extent_size_may_change_between_runs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    let (log, _) = open(&path);
    log.mark(p("a"), ES + 5..ES + 6).unwrap();
    drop(log);
    let (log, rec) = IntentLog::open(&path, MIB).unwrap();
    assert_eq!(dirty_of(&rec), vec![("a".into(), vec![ES..2 * ES])]);
    assert_eq!(log.marked_extents(), 4);
    drop(log);
    let (_, rec) = IntentLog::open(&path, 16 * MIB).unwrap();
    assert_eq!(dirty_of(&rec), vec![("a".into(), vec![ES..2 * ES])]);
}

#[test]
fn bad_files_and_arguments_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    let (log, _) = open(&path);
    log.mark(p("a"), 0..1).unwrap();
    drop(log);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[8..12].copy_from_slice(&9u32.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let e = IntentLog::open(&path, ES).unwrap_err();
    assert!(
        matches!(e, IntentError::NewerVersion { found: 9, .. }),
        "{e}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("upgrade ferry") && msg.contains(FILE_NAME),
        "{msg}"
    );
    // The refused file is left alone.
    assert_eq!(std::fs::read(&path).unwrap(), bytes);

    bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
    bytes[20] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let e = IntentLog::open(&path, ES).unwrap_err();
    assert!(matches!(e, IntentError::CorruptHeader { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("every image must be re-read in full"),
        "{e}"
    );

    std::fs::write(&path, b"#!/bin/sh\necho not a log\n").unwrap();
    let e = IntentLog::open(&path, ES).unwrap_err();
    assert!(matches!(e, IntentError::NotIntentLog { .. }), "{e}");

    let e = IntentLog::open(&path, 3000).unwrap_err();
    assert!(matches!(e, IntentError::ExtentSize { size: 3000 }), "{e}");

    let e = IntentLog::open(&dir.path().join("missing/intent.log"), ES).unwrap_err();
    assert!(matches!(e, IntentError::Io { .. }), "{e}");
    assert!(e.to_string().contains("missing/intent.log"), "{e}");

    let (log, _) = IntentLog::open(&dir.path().join("other.log"), ES).unwrap();
    let e = log.mark(p(""), 0..1).unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL);
    let long = PathBuf::from("x".repeat(5000));
    let e = log.mark(&long, 0..1).unwrap_err();
    assert_eq!(e.errno(), libc::ENAMETOOLONG);
}

#[test]
fn a_waiter_gets_its_own_copy_of_the_error() {
    let e = IntentError::Io {
        action: "append to",
        path: "/s/intent.log".into(),
        source: io::Error::from_raw_os_error(libc::ENOSPC),
    };
    let d = e.duplicate();
    assert_eq!(d.errno(), libc::ENOSPC);
    assert_eq!(d.to_string(), e.to_string());
}
