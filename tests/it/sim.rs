//! The simulated disk keeps its promises.

use livecopy::storage::{SectorFate, SimDisk, Storage, WriteFate};

#[test]
fn process_crash_keeps_pending_writes_and_power_loss_may_drop_them() {
    let disk = SimDisk::new(8192);
    disk.write_at(0, &[1; 4096]).unwrap();
    disk.sync_data().unwrap();
    disk.write_at(4096, &[2; 4096]).unwrap();

    let after_kill = disk.after_process_crash();
    let mut buf = [0u8; 4096];
    after_kill.read_at(4096, &mut buf).unwrap();
    assert_eq!(
        buf, [2; 4096],
        "a killed process's writes stay in the page cache"
    );
    assert_eq!(
        after_kill.pending().len(),
        1,
        "but they are not durable yet"
    );

    let dropped = disk.after_power_loss(|_, _| WriteFate::Drop);
    dropped.read_at(4096, &mut buf).unwrap();
    assert_eq!(buf, [0; 4096]);
    dropped.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, [1; 4096], "synced data survives power loss");
}

#[test]
fn torn_write_mixes_old_new_and_garbage_per_sector() {
    let disk = SimDisk::new(4096);
    disk.write_at(0, &[7; 4096]).unwrap();
    let mut fates = vec![SectorFate::Old; 8];
    fates[1] = SectorFate::New;
    fates[2] = SectorFate::Garbage(3);
    let torn = disk.after_power_loss(|_, _| WriteFate::Tear(fates.clone()));
    let bytes = torn.durable_bytes();
    assert!(bytes[..512].iter().all(|&b| b == 0));
    assert!(bytes[512..1024].iter().all(|&b| b == 7));
    assert!(bytes[1024..1536].iter().any(|&b| b != 0 && b != 7));
    assert!(bytes[1536..].iter().all(|&b| b == 0));
}

#[test]
fn media_faults_behave_as_documented() {
    let disk = SimDisk::new(3 * 4096);
    // Lost write: readable now, never durable.
    disk.lose_next_write();
    disk.write_at(0, &[1; 4096]).unwrap();
    disk.sync_data().unwrap();
    assert_eq!(disk.live_bytes()[0], 1);
    assert_eq!(disk.durable_bytes()[0], 0);
    // Misdirected write lands elsewhere.
    disk.misdirect_next_write(8192);
    disk.write_at(4096, &[2; 4096]).unwrap();
    disk.sync_data().unwrap();
    assert_eq!(disk.durable_bytes()[4096], 0);
    assert_eq!(disk.durable_bytes()[8192], 2);
    // Sync EIO: reported once, pages then count as clean.
    disk.write_at(4096, &[3; 4096]).unwrap();
    disk.fail_next_sync(false);
    assert!(disk.sync_data().is_err());
    assert!(
        disk.sync_data().is_ok(),
        "as on Linux, the next sync has nothing left to report"
    );
    assert_eq!(
        disk.durable_bytes()[4096],
        0,
        "the failed sync's data never landed"
    );
    // Read EIO.
    disk.fail_reads(100..200);
    let mut buf = [0u8; 10];
    assert!(disk.read_at(150, &mut buf).is_err());
    assert!(disk.read_at(300, &mut buf).is_ok());
    // Rot flips one bit of the medium.
    disk.rot(8192, 0);
    assert_eq!(disk.durable_bytes()[8192], 3);
    // Write error after a partial write.
    disk.fail_next_write(std::io::ErrorKind::StorageFull, 512);
    let err = disk.write_at(0, &[9; 4096]).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(28));
    assert_eq!(disk.live_bytes()[0], 9);
    assert_eq!(disk.live_bytes()[512], 1);
}

#[test]
fn a_crashed_process_can_do_nothing() {
    let disk = SimDisk::new(4096);
    disk.crash_at(1);
    disk.write_at(0, &[1; 16]).unwrap();
    assert!(disk.is_crashed());
    assert!(disk.sync_data().is_err());
    assert!(disk.write_at(0, &[2; 16]).is_err());
    assert_eq!(disk.live_bytes()[0], 1);
    assert!(disk.durable_bytes().iter().all(|&b| b == 0));
}

#[test]
fn a_durable_write_is_durable_alone_and_never_undone_by_an_older_pending_write() {
    let disk = SimDisk::new(3 * 4096);
    // Pending: an old write under the durable one, and one elsewhere.
    disk.write_at(0, &[1; 8192]).unwrap();
    disk.write_at(8192, &[2; 4096]).unwrap();
    disk.write_durable_at(2048, &[3; 4096]).unwrap();
    assert_eq!(disk.syncs_seen(), 0, "a durable write is not a sync call");

    let dropped = disk.after_power_loss(|_, _| WriteFate::Drop);
    let bytes = dropped.durable_bytes();
    assert!(
        bytes[..2048].iter().all(|&b| b == 0),
        "older pending: dropped"
    );
    assert!(
        bytes[2048..6144].iter().all(|&b| b == 3),
        "the durable write"
    );
    assert!(
        bytes[6144..].iter().all(|&b| b == 0),
        "other pending writes stay pending"
    );

    let applied = disk.after_power_loss(|_, _| WriteFate::Apply);
    let bytes = applied.durable_bytes();
    assert!(bytes[..2048].iter().all(|&b| b == 1));
    assert!(
        bytes[2048..6144].iter().all(|&b| b == 3),
        "the older pending write, applied, must not cover the durable bytes"
    );
    assert!(bytes[6144..8192].iter().all(|&b| b == 1));
    assert!(bytes[8192..].iter().all(|&b| b == 2));
}

#[test]
fn a_durable_write_whose_sync_fails_is_not_retried_by_the_next_sync() {
    for persisted in [false, true] {
        let disk = SimDisk::new(4096);
        disk.fail_next_sync(persisted);
        let error = disk.write_durable_at(0, &[5; 4096]).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(5), "EIO");
        let mut buf = [0u8; 4096];
        disk.read_at(0, &mut buf).unwrap();
        assert_eq!(buf, [5; 4096], "the page cache holds the data");
        // As on Linux: the pages are clean now, a later sync writes nothing.
        disk.sync_data().unwrap();
        let expected = if persisted { 5 } else { 0 };
        assert!(
            disk.durable_bytes().iter().all(|&b| b == expected),
            "persisted={persisted}"
        );
    }
    // A failed write part: nothing durable, the error reported.
    let disk = SimDisk::new(4096);
    disk.fail_next_write(std::io::ErrorKind::StorageFull, 512);
    let error = disk.write_durable_at(0, &[6; 4096]).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(28), "ENOSPC");
    assert!(disk.durable_bytes().iter().all(|&b| b == 0));
}
