//! What `copyctl serve` exports, checked against how Linux reports a
//! write-back error: once per open file, to whichever caller looks first.
//! Two flushes (or a flush and a FUA write) that overlap must both fail,
//! on the image served after a job ended as on the live copy's guest.

use std::sync::{Arc, Barrier, Condvar, Mutex};
use std::time::{Duration, Instant};

use livecopy::ErrorKind;
use livecopy::engine::{Config, Job, JobPhase, StepOutcome};
use livecopy::export::ImageDevice;
use livecopy::journal::Journal;
use livecopy::journal::format::JOURNAL_LEN;
use livecopy::nbd::ExportDevice;
use livecopy::storage::{SimDisk, Storage};

use crate::support::{UUID, first_record};

const SIZE: u64 = 64 << 10;

/// A disk with Linux's errseq rule for write-back errors: once armed, the
/// next call that can report one (fdatasync, a durable write) reports EIO
/// and every later one reports success, although the data is lost. A call
/// that finds no other call running waits a little for one to overlap it,
/// as concurrent flushes on two connections do.
#[derive(Clone)]
struct ErrSeq {
    disk: SimDisk,
    state: Arc<(Mutex<ErrState>, Condvar)>,
}

#[derive(Default)]
struct ErrState {
    /// A write-back error not yet reported to anyone.
    unreported: bool,
    /// Error-reporting calls running now.
    running: usize,
    /// Error-reporting calls that reached the disk.
    calls: usize,
}

impl ErrSeq {
    fn new(disk: SimDisk) -> Self {
        ErrSeq {
            disk,
            state: Arc::default(),
        }
    }

    fn lose_write_back(&self) {
        self.state.0.lock().unwrap().unreported = true;
    }

    fn calls(&self) -> usize {
        self.state.0.lock().unwrap().calls
    }

    fn report(&self) -> std::io::Result<()> {
        let (lock, changed) = &*self.state;
        let mut state = lock.lock().unwrap();
        state.running += 1;
        state.calls += 1;
        changed.notify_all();
        let deadline = Instant::now() + Duration::from_millis(300);
        while state.running < 2 && Instant::now() < deadline {
            state = changed
                .wait_timeout(state, Duration::from_millis(10))
                .unwrap()
                .0;
        }
        state.running -= 1;
        if std::mem::take(&mut state.unreported) {
            Err(std::io::Error::from_raw_os_error(5))
        } else {
            Ok(())
        }
    }
}

impl Storage for ErrSeq {
    fn len(&self) -> std::io::Result<u64> {
        self.disk.len()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.disk.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.disk.write_at(offset, data)
    }
    fn write_durable_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.disk.write_at(offset, data)?;
        self.report()
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.disk.sync_data()?;
        self.report()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.disk.set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.disk.punch_hole(offset, len)
    }
}

/// A plain write whose write-back then fails, followed by two requests at
/// once that can each report it: `second_fua` makes the second one a FUA
/// write instead of a flush. Neither may succeed, nor may anything after.
fn check_overlapping_reports(device: Arc<dyn ExportDevice>, disk: &ErrSeq, second_fua: bool) {
    device.write(0, &[7u8; 4096], false).expect("plain write");
    disk.lose_write_back();
    let barrier = Barrier::new(2);
    let outcomes: Vec<livecopy::Result<()>> = std::thread::scope(|scope| {
        let first = scope.spawn(|| {
            barrier.wait();
            device.flush()
        });
        let second = scope.spawn(|| {
            barrier.wait();
            if second_fua {
                device.write(8192, &[9u8; 4096], true)
            } else {
                device.flush()
            }
        });
        vec![first.join().unwrap(), second.join().unwrap()]
    });
    for (n, outcome) in outcomes.iter().enumerate() {
        assert!(
            outcome.is_err(),
            "request {n} was acknowledged after the data was lost ({} calls reached the disk)",
            disk.calls()
        );
    }
    let later = device.flush().expect_err("a later flush");
    assert_eq!(later.kind(), ErrorKind::Poisoned, "{}", later.describe());
}

#[test]
fn overlapping_flushes_on_a_served_image_both_fail() {
    for second_fua in [false, true] {
        let disk = ErrSeq::new(SimDisk::new(SIZE));
        let device = ImageDevice::new(disk.clone(), SIZE).expect("device");
        check_overlapping_reports(Arc::new(device), &disk, second_fua);
    }
}

#[test]
fn overlapping_flushes_on_the_switched_guest_both_fail() {
    for second_fua in [false, true] {
        let source = ErrSeq::new(SimDisk::new(SIZE));
        let destination = ErrSeq::new(SimDisk::new(SIZE));
        let journal =
            Journal::format(SimDisk::new(JOURNAL_LEN), UUID, first_record()).expect("format");
        let config = Config {
            granularity: 4096,
            chunk_size: 8192,
            copy_workers: 1,
            ..Config::default()
        };
        let job = Job::new(journal, source, destination.clone(), config).expect("job");
        while job.copy_step().expect("step") != StepOutcome::Done {}
        job.switch().expect("switch");
        assert_eq!(job.status().phase, JobPhase::Switched);
        check_overlapping_reports(Arc::new(job.guest()), &destination, second_fua);
    }
}

/// The served image is the guest's disk as the job recorded it: a larger
/// destination exports the source's size, never the tail the copy did not
/// write; an image smaller than the disk is refused.
#[test]
fn a_served_image_has_the_disks_size() {
    let device = ImageDevice::new(SimDisk::new(2 * SIZE), SIZE).expect("device");
    assert_eq!(device.size(), SIZE);
    let refused = ImageDevice::new(SimDisk::new(SIZE - 512), SIZE)
        .err()
        .expect("a smaller image");
    assert_eq!(refused.kind(), ErrorKind::InvalidInput);
}

/// A new process's first flush syncs the image even if it wrote nothing
/// itself: the writes a killed engine acknowledged may still be cached.
#[test]
fn the_first_flush_of_a_served_image_always_syncs() {
    let disk = SimDisk::new(SIZE);
    disk.write_at(0, &[3u8; 512])
        .expect("a write of an earlier process");
    let device = ImageDevice::new(disk.clone(), SIZE).expect("device");
    let syncs = disk.syncs_seen();
    device.flush().expect("flush");
    assert_eq!(disk.syncs_seen(), syncs + 1, "the first flush synced");
    assert_eq!(&disk.durable_bytes()[..512], &[3u8; 512]);
    device.flush().expect("flush");
    assert_eq!(
        disk.syncs_seen(),
        syncs + 1,
        "a flush with nothing new is free"
    );
}
