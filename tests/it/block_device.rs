//! Images on block devices: loop devices with 4 KiB logical blocks, made
//! and removed by each test (the tests run as root, as CI does).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use livecopy::engine::{Config, JobPhase, files};
use livecopy::storage::{FileStorage, Storage};

const SIZE: u64 = 4 << 20;

/// A loop device over a file, detached when dropped.
struct Loop {
    device: PathBuf,
}

impl Loop {
    fn new(backing: &Path, block_size: u32) -> Loop {
        let out = Command::new("losetup")
            .args(["--find", "--show", "--sector-size", &block_size.to_string()])
            .arg(backing)
            .output()
            .expect("run losetup (util-linux)");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let device = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Loop { device }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

fn patterned(path: &Path, seed: u8) -> Vec<u8> {
    let bytes: Vec<u8> = (0..SIZE).map(|i| (i / 512) as u8 ^ seed).collect();
    std::fs::write(path, &bytes).expect("write image");
    bytes
}

/// A discard that is not aligned to the device's 4 KiB logical blocks
/// zeroes exactly its range: the partial blocks are written, the whole
/// ones discarded (fallocate alone refuses it with EINVAL).
#[test]
fn an_unaligned_discard_on_a_4k_block_device_zeroes_exactly_its_range() {
    let dir = tempfile::tempdir().expect("tempdir");
    let backing = dir.path().join("disk.img");
    let mut expected = patterned(&backing, 0x11);
    let device = Loop::new(&backing, 4096);
    let storage = FileStorage::open_image(&device.device, true).expect("open the device");
    for (offset, len) in [(512u64, 3584u64), (4096 + 100, 3 * 4096), (20_000, 10)] {
        storage.punch_hole(offset, len).unwrap_or_else(|e| {
            panic!("discard {offset}+{len} on {}: {e}", device.device.display())
        });
        expected[offset as usize..(offset + len) as usize].fill(0);
    }
    let mut back = vec![0u8; SIZE as usize];
    storage.read_at(0, &mut back).expect("read back");
    assert!(
        back == expected,
        "the device holds what the discards asked for"
    );
}

/// A guest discard of 3584 bytes at 512 while the job is Ready, with the
/// destination (then the source) on a 4 KiB block device: the guest gets
/// success, the job stays Ready, and both images read zeros there.
#[test]
fn an_unaligned_guest_discard_keeps_a_job_on_block_devices_ready() {
    for device_side in ["destination", "source"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let source_file = dir.path().join("source.img");
        let dest_file = dir.path().join("dest.img");
        patterned(&source_file, 0x22);
        std::fs::write(&dest_file, vec![0u8; SIZE as usize]).expect("destination");
        let (loop_device, source, destination) = if device_side == "destination" {
            let l = Loop::new(&dest_file, 4096);
            let d = l.device.clone();
            (l, source_file.clone(), d)
        } else {
            let l = Loop::new(&source_file, 4096);
            let s = l.device.clone();
            (l, s, dest_file.clone())
        };
        let journal = dir.path().join("copy.journal");
        let mut job =
            files::start(&journal, &source, &destination, Config::default()).expect("start");
        job.start_workers().expect("workers");
        assert_eq!(job.wait_ready(Duration::from_secs(60)), JobPhase::Ready);
        let guest = job.guest();
        guest
            .discard(512, 3584)
            .unwrap_or_else(|e| panic!("{device_side}: discard: {}", e.describe()));
        let status = job.status();
        assert_eq!(status.phase, JobPhase::Ready, "{device_side}: {status:?}");
        let mut back = vec![1u8; 3584];
        guest.read(512, &mut back).expect("read");
        assert!(back.iter().all(|&b| b == 0), "{device_side}: zeros");
        job.switch().expect("switch");
        let mut after = vec![1u8; 4096];
        guest.read(0, &mut after).expect("read after the switch");
        assert!(
            after[512..].iter().all(|&b| b == 0),
            "{device_side}: zeros after"
        );
        drop(guest);
        drop(job);
        drop(loop_device);
    }
}

/// The NBD export's minimum block size is the images' logical block size:
/// a served 4 KiB device says 4096, a live copy from a file onto one says
/// 4096 too (the larger of the two), a file alone says 1.
#[test]
fn the_export_advertises_the_devices_logical_block_size() {
    use livecopy::export::ImageDevice;
    use livecopy::nbd::ExportDevice;
    use livecopy::storage::NbdStorage;
    use std::sync::Arc;
    let dir = tempfile::tempdir().expect("tempdir");
    let backing = dir.path().join("disk.img");
    patterned(&backing, 0x22);
    let file = dir.path().join("file.img");
    patterned(&file, 0x33);
    let device = Loop::new(&backing, 4096);
    let minimum = |export: Arc<dyn ExportDevice>| {
        let socket = dir.path().join("nbd.sock");
        let server = livecopy::nbd::bind_unix(&socket, export, "")
            .expect("bind")
            .spawn();
        let address = crate::support::unix_address(&socket, "");
        let info = NbdStorage::connect(&address, false)
            .expect("connect")
            .info();
        server.shutdown().expect("shutdown");
        info.block.minimum
    };
    let open = |path: &Path| FileStorage::open_image(path, true).expect("open");
    let served = ImageDevice::new(open(&device.device), SIZE).expect("device");
    assert_eq!(minimum(Arc::new(served)), 4096, "a 4 KiB device");
    let served = ImageDevice::new(open(&file), SIZE).expect("file");
    assert_eq!(minimum(Arc::new(served)), 1, "a file");
    let journal = dir.path().join("copy.journal");
    let job = files::start(&journal, &file, &device.device, Config::default()).expect("start");
    assert_eq!(
        minimum(Arc::new(job.guest())),
        4096,
        "a file onto a 4 KiB device"
    );
    drop(job);
}
