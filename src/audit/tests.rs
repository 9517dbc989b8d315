//! The audit log against tampering, torn writes and rotation, with a software sealer.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hsmca_hsm::Signer;

use super::{AuditLog, AuditOptions, Kind, Record, verify};
use crate::issuance::test_signer::SoftwareSigner;

fn options() -> AuditOptions {
    AuditOptions {
        checkpoint_every: 16,
        checkpoint_interval: Duration::from_secs(3600),
        max_file_bytes: 64 * 1024 * 1024,
    }
}

fn decision(i: usize) -> Record {
    Record {
        kind: Kind::Decision,
        decision: Some("deny".into()),
        reason: Some(format!("test reason {i}")),
        identities: vec![format!("spiffe://cluster.local/ns/n{i}/sa/s")],
        ..Default::default()
    }
}

/// Writes `n` records and closes the log; returns the sealer.
fn write_log(dir: &Path, n: usize, opts: AuditOptions) -> Arc<SoftwareSigner> {
    let sealer = Arc::new(SoftwareSigner::new());
    let log = AuditLog::open(dir, Some(sealer.clone() as Arc<dyn Signer>), opts).unwrap();
    for i in 0..n {
        log.append_durable_blocking(decision(i)).unwrap();
    }
    log.close();
    sealer
}

fn file(dir: &Path) -> std::path::PathBuf {
    dir.join("audit-000001.jsonl")
}

fn lines(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(file(dir))
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

fn rewrite(dir: &Path, lines: &[String]) {
    std::fs::write(
        file(dir),
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
}

#[test]
fn an_untouched_log_verifies_and_is_sealed() {
    let dir = tempfile::tempdir().unwrap();
    let sealer = write_log(dir.path(), 100, options());
    let report = verify(dir.path(), sealer.public_key(), 0).unwrap();
    // 100 records + a stop record, sealed every 16 and once more at close.
    assert_eq!(report.records - report.checkpoints, 101);
    assert!(report.checkpoints >= 7, "{report:?}");
    assert_eq!(report.unsealed_tail, 0);
    // Another key does not verify it.
    let other = SoftwareSigner::new();
    assert!(verify(dir.path(), other.public_key(), 1000).is_err());
}

#[test]
fn one_changed_byte_in_a_middle_record_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let sealer = write_log(dir.path(), 40, options());
    let mut l = lines(dir.path());
    l[10] = l[10].replacen("test reason", "test reasoN", 1);
    rewrite(dir.path(), &l);
    let p = verify(dir.path(), sealer.public_key(), 1000).unwrap_err();
    assert_eq!(p.line, 12, "{p}");
    assert!(
        p.what.contains("hash link broken") && p.to_string().contains(":11"),
        "{p}"
    );
}

#[test]
fn a_deleted_record_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let sealer = write_log(dir.path(), 40, options());
    let mut l = lines(dir.path());
    l.remove(5);
    rewrite(dir.path(), &l);
    let p = verify(dir.path(), sealer.public_key(), 1000).unwrap_err();
    assert_eq!((p.line, p.seq), (6, Some(6)), "{p}");
    assert!(p.what.contains("missing"), "{p}");
}

#[test]
fn swapped_records_are_found() {
    let dir = tempfile::tempdir().unwrap();
    let sealer = write_log(dir.path(), 40, options());
    let mut l = lines(dir.path());
    l.swap(7, 8);
    rewrite(dir.path(), &l);
    let p = verify(dir.path(), sealer.public_key(), 1000).unwrap_err();
    assert_eq!(p.line, 8, "{p}");
}

#[test]
fn an_altered_checkpoint_signature_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let sealer = write_log(dir.path(), 40, options());
    let mut l = lines(dir.path());
    let i = l
        .iter()
        .position(|x| x.contains("\"kind\":\"checkpoint\""))
        .unwrap();
    let rec: Record = serde_json::from_str(&l[i]).unwrap();
    let sig = rec.sig.unwrap();
    let mut bytes =
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &sig).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x01;
    let forged = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, bytes);
    l[i] = l[i].replace(&sig, &forged);
    rewrite(dir.path(), &l);
    let p = verify(dir.path(), sealer.public_key(), 1000).unwrap_err();
    assert_eq!(p.line, i + 1, "{p}");
    assert!(p.what.contains("signature"), "{p}");
}

#[test]
fn a_log_cut_in_the_middle_of_a_line_is_found_and_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let sealer = write_log(dir.path(), 20, options());
    let mut content = std::fs::read(file(dir.path())).unwrap();
    let keep = content.len() - 30;
    content.truncate(keep);
    std::fs::write(file(dir.path()), &content).unwrap();
    let p = verify(dir.path(), sealer.public_key(), 1000).unwrap_err();
    assert!(p.what.contains("middle of a line"), "{p}");

    // Re-opening keeps the torn bytes aside, records that, and continues the chain.
    let log = AuditLog::open(
        dir.path(),
        Some(sealer.clone() as Arc<dyn Signer>),
        options(),
    )
    .unwrap();
    log.append_durable_blocking(decision(99)).unwrap();
    log.close();
    let torn: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("torn-"))
        .collect();
    assert_eq!(torn.len(), 1);
    let kept = std::fs::read(torn[0].path()).unwrap();
    assert!(content.ends_with(&kept));
    assert!(
        lines(dir.path())
            .iter()
            .any(|l| l.contains("\"kind\":\"recovered\""))
    );
    verify(dir.path(), sealer.public_key(), 1000).unwrap();
}

#[test]
fn the_chain_continues_across_rotated_files() {
    let dir = tempfile::tempdir().unwrap();
    let opts = AuditOptions {
        max_file_bytes: 4096,
        ..options()
    };
    let sealer = write_log(dir.path(), 100, opts.clone());
    let files = super::log_files(dir.path()).unwrap();
    assert!(files.len() >= 3, "{files:?}");
    verify(dir.path(), sealer.public_key(), 0).unwrap();
    // Re-opening continues in the last file.
    let log = AuditLog::open(dir.path(), Some(sealer.clone() as Arc<dyn Signer>), opts).unwrap();
    log.append_durable_blocking(decision(1)).unwrap();
    log.close();
    verify(dir.path(), sealer.public_key(), 0).unwrap();
    // A whole missing file is found.
    std::fs::remove_file(&files[1]).unwrap();
    let p = verify(dir.path(), sealer.public_key(), 1000).unwrap_err();
    assert!(p.what.contains("missing"), "{p}");
}

#[test]
fn concurrent_appends_share_fsyncs_and_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let sealer = Arc::new(SoftwareSigner::new());
    let log = Arc::new(
        AuditLog::open(
            dir.path(),
            Some(sealer.clone() as Arc<dyn Signer>),
            options(),
        )
        .unwrap(),
    );
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                (0..50)
                    .map(|i| log.append_durable_blocking(decision(t * 100 + i)).unwrap())
                    .collect::<Vec<u64>>()
            })
        })
        .collect();
    let mut seqs: Vec<u64> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    log.close();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), 400, "every append got its own sequence number");
    let report = verify(dir.path(), sealer.public_key(), 0).unwrap();
    assert_eq!(report.records - report.checkpoints, 401);
}

/// `chattr +i` makes the log file unwritable even for root (ext4); returns false where the
/// file system does not support it.
fn set_immutable(path: &Path, on: bool) -> bool {
    std::process::Command::new("chattr")
        .arg(if on { "+i" } else { "-i" })
        .arg(path)
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn a_failed_write_refuses_the_record_and_recovers_when_writing_works_again() {
    let dir = tempfile::tempdir().unwrap();
    let sealer = Arc::new(SoftwareSigner::new());
    let log = AuditLog::open(
        dir.path(),
        Some(sealer.clone() as Arc<dyn Signer>),
        options(),
    )
    .unwrap();
    log.append_durable_blocking(decision(0)).unwrap();
    if !set_immutable(&file(dir.path()), true) {
        assert!(
            std::env::var_os("HSMCA_REQUIRE_TOOLS").is_none(),
            "chattr +i is needed for this test"
        );
        eprintln!("skipped: chattr +i is not supported here");
        return;
    }
    let refused = log.append_durable_blocking(decision(1));
    let healthy_while_broken = log.is_healthy();
    set_immutable(&file(dir.path()), false);
    assert!(
        refused.is_err(),
        "a record that could not be written must be refused"
    );
    assert!(!healthy_while_broken);
    let seq = log.append_durable_blocking(decision(2)).unwrap();
    assert!(log.is_healthy());
    assert_eq!(seq, 1, "the refused record left no trace in the chain");
    log.close();
    verify(dir.path(), sealer.public_key(), 0).unwrap();
}
