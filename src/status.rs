//! Rendering the Admin API's status for people (`thinsnap status`, a table like `docker info`'s
//! devicemapper section) and for scripts (`--json`). Pure formatting: it asks nothing.

use std::fmt::Write;

use crate::admin::api::StatusResponse;

/// Bytes in binary units (`1.5 GiB`).
pub fn human(bytes: u64) -> String {
    bytesize::ByteSize::b(bytes).display().iec().to_string()
}

fn pct(used: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        used as f64 * 100.0 / total as f64
    }
}

/// The free-space floor in bytes of data space (the percentage of the pool's data size).
fn floor_bytes(st: &StatusResponse) -> u64 {
    let total = st.data.as_ref().map_or(0, |d| d.total_bytes);
    (total as f64 * st.min_free_space_percent / 100.0) as u64
}

/// What an operator must do about an unhealthy pool (one that takes no changes, so not even a
/// Remove can win space back), or `None` for a healthy one.
pub fn action(st: &StatusResponse) -> Option<String> {
    let meta = st.metadata.clone().unwrap_or_default();
    let grow_meta = if st.pool_mode == "loop" {
        "`thinsnap pool grow --metadata-size SIZE`"
    } else {
        "`lvextend --poolmetadatasize +SIZE VG/POOL` (lvm) or the pool owner's tools"
    };
    let repair = "stop thinsnap and repair the metadata offline (`thin_check`/`thin_repair`; `lvconvert --repair VG/POOL` for LVM), then start thinsnap";
    if st.needs_check {
        Some(format!("the pool's metadata needs checking: {repair}"))
    } else if st.read_only && meta.total_bytes > 0 && meta.used_bytes >= meta.total_bytes / 100 * 99
    {
        Some(format!(
            "the pool's metadata is full, so it takes no changes (Remove cannot free space): grow it with {grow_meta}; the pool resumes writing at once"
        ))
    } else if st.read_only {
        Some(format!(
            "the pool is read-only (after a metadata error, or loaded read-only) and takes no changes (Remove cannot free space): see the kernel log (dmesg); {repair}"
        ))
    } else if st.out_of_data_space {
        Some(if st.pool_mode == "loop" {
            "the pool's data space is full: Remove snapshots, or grow it with `thinsnap pool grow --data-size SIZE`".to_string()
        } else {
            "the pool's data space is full: Remove snapshots, or grow it with `lvextend` (lvm) or the pool owner's tools".to_string()
        })
    } else {
        None
    }
}

/// `st` as the text `thinsnap status` prints, or as JSON with `json`.
pub fn render(st: &StatusResponse, json: bool) -> String {
    let mut out = String::new();
    macro_rules! w {
        ($($arg:tt)*) => {
            writeln!(out, $($arg)*).expect("writing to a String cannot fail")
        };
    }
    let data = st.data.clone().unwrap_or_default();
    let meta = st.metadata.clone().unwrap_or_default();
    if json {
        let v = serde_json::json!({
            "pool_name": st.pool_name,
            "pool_mode": st.pool_mode,
            "root": st.root,
            "block_size_bytes": st.block_size_bytes,
            "base_size_bytes": st.base_size_bytes,
            "new_image_size_bytes": st.new_image_size_bytes,
            "base_thin_id": st.base_thin_id,
            "fs_type": st.fs_type,
            "data": {"used_bytes": data.used_bytes, "total_bytes": data.total_bytes,
                     "available_bytes": data.total_bytes.saturating_sub(data.used_bytes)},
            "metadata": {"used_bytes": meta.used_bytes, "total_bytes": meta.total_bytes,
                         "available_bytes": meta.total_bytes.saturating_sub(meta.used_bytes)},
            "min_free_space_percent": st.min_free_space_percent,
            "transaction_id": st.transaction_id,
            "health": {"read_only": st.read_only, "out_of_data_space": st.out_of_data_space,
                       "needs_check": st.needs_check, "error_if_no_space": st.error_if_no_space,
                       "action": action(st)},
            "snapshots": {"active": st.snapshots_active, "view": st.snapshots_view,
                          "committed": st.snapshots_committed,
                          "inactive": st.snapshots_inactive},
            "spares": {"ready": st.spares_ready, "target": st.spares_target,
                       "taken": st.spares_taken, "missed": st.spares_missed,
                       "thin_ids": st.spare_thin_ids},
            "audit": {"runs": st.audit_runs, "at_ns": st.audit_at_ns,
                      "unknown_thin_ids": st.audit_unknown_thin_ids,
                      "missing_thin_ids": st.audit_missing_thin_ids,
                      "error": (!st.audit_error.is_empty()).then_some(&st.audit_error)},
            "quarantined": st.quarantined.iter().map(|q| serde_json::json!(
                {"key": q.key, "thin_id": q.thin_id, "kind": q.kind, "reason": q.reason}))
                .collect::<Vec<_>>(),
            "thin_ids_in_use": st.thin_ids_in_use,
            "deferred_removal": true,
            "deferred_deletion": st.remove_async,
            "deleting_devices": st.deleting_devices,
            "min_free_space_bytes": floor_bytes(st),
            "loop_files": st.loop_files.iter().map(|l| serde_json::json!(
                {"role": l.role, "file": l.file, "device": l.device})).collect::<Vec<_>>(),
        });
        return serde_json::to_string_pretty(&v).expect("a JSON value always serializes") + "\n";
    }
    w!("Pool Name:                 {}", st.pool_name);
    w!("Pool Mode:                 {}", st.pool_mode);
    w!("Root:                      {}", st.root);
    w!("Pool Blocksize:            {}", human(st.block_size_bytes));
    w!("Base Device Size:          {}", human(st.base_size_bytes));
    if st.new_image_size_bytes > st.base_size_bytes {
        w!(
            "New Images' Size:          {} (fs.base_size, raised after the base was made)",
            human(st.new_image_size_bytes)
        );
    }
    w!("Backing Filesystem:        {}", st.fs_type);
    for (what, s) in [("Data", &data), ("Metadata", &meta)] {
        w!(
            "{:<27}{} ({:.1}%)",
            format!("{what} Space Used:"),
            human(s.used_bytes),
            pct(s.used_bytes, s.total_bytes)
        );
        w!(
            "{:<27}{}",
            format!("{what} Space Total:"),
            human(s.total_bytes)
        );
        w!(
            "{:<27}{}",
            format!("{what} Space Available:"),
            human(s.total_bytes.saturating_sub(s.used_bytes))
        );
    }
    w!(
        "Minimum Free Space:        {}% ({} of data space; Docker's dm.min_free_space)",
        st.min_free_space_percent,
        human(floor_bytes(st))
    );
    // Docker's devicemapper section showed these: a device still open when it is to go is
    // removed at its last close (always, DM_DEFERRED_REMOVE); `[remove] async` is deferred
    // deletion.
    w!("Deferred Removal Enabled:  true");
    w!(
        "Deferred Deletion Enabled: {} ([remove] async)",
        st.remove_async
    );
    w!("Deferred Deleted Devices:  {}", st.deleting_devices);
    w!("Transaction Id:            {}", st.transaction_id);
    let mut health = Vec::new();
    if st.read_only {
        health.push("read-only");
    }
    if st.out_of_data_space {
        health.push("out of data space");
    }
    if st.needs_check {
        health.push("needs_check");
    }
    w!(
        "Health:                    {}",
        if health.is_empty() {
            "ok".to_string()
        } else {
            health.join(", ")
        }
    );
    if let Some(a) = action(st) {
        w!("Action Needed:             {a}");
    }
    w!("Error If No Space:         {}", st.error_if_no_space);
    w!(
        "Snapshots:                 {} active, {} view, {} committed",
        st.snapshots_active,
        st.snapshots_view,
        st.snapshots_committed
    );
    w!(
        "Awaiting Activation:       {} (devices made on first use)",
        st.snapshots_inactive
    );
    if st.spares_target == 0 {
        w!("Warm Spares:               off");
    } else {
        // What the ready ones cost (README.md, "Warm spares"): an active dm device each and a
        // device record in the pool's metadata; a snapshot shares all its origin's blocks.
        w!(
            "Warm Spares:               {} ready / {} (taken {}, missed {}; cost: {} active dm device(s), no pool data until taken)",
            st.spares_ready,
            st.spares_target,
            st.spares_taken,
            st.spares_missed,
            st.spares_ready
        );
    }
    w!("Thin Id Audit:             {}", audit_line(st));
    w!("Quarantined:               {}", st.quarantined.len());
    for q in &st.quarantined {
        w!(
            "  {:?} ({}, thin id {}): {}",
            q.key,
            q.kind,
            q.thin_id,
            q.reason
        );
    }
    w!(
        "Thin Ids In Use:           {} (base: {})",
        st.thin_ids_in_use,
        st.base_thin_id
    );
    for l in &st.loop_files {
        w!(
            "{:<27}{} on {}",
            format!("Loop {} File:", capitalised(&l.role)),
            l.file,
            l.device
        );
    }
    out
}

/// The audit of thin ids in one line: none yet, what the last one found, or why it failed.
fn audit_line(st: &StatusResponse) -> String {
    if st.audit_runs == 0 {
        return "not run yet (after each start and at each Cleanup)".to_string();
    }
    let ids = |v: &[u32]| {
        let shown: Vec<String> = v.iter().take(16).map(u32::to_string).collect();
        let more = if v.len() > 16 { ", ..." } else { "" };
        format!("{}{more}", shown.join(", "))
    };
    let mut found = Vec::new();
    if !st.audit_unknown_thin_ids.is_empty() {
        found.push(format!(
            "{} in the pool with no record, left alone (ids {})",
            st.audit_unknown_thin_ids.len(),
            ids(&st.audit_unknown_thin_ids)
        ));
    }
    if !st.audit_missing_thin_ids.is_empty() {
        found.push(format!(
            "{} of ready records missing from the pool (ids {})",
            st.audit_missing_thin_ids.len(),
            ids(&st.audit_missing_thin_ids)
        ));
    }
    let mut line = if found.is_empty() {
        "the pool's thin ids are the store's".to_string()
    } else {
        found.join("; ")
    };
    if !st.audit_error.is_empty() {
        line = format!("last audit failed: {} (before: {line})", st.audit_error);
    }
    format!("{line} ({} run(s))", st.audit_runs)
}

/// `data` -> `Data`, as the other labels are written.
fn capitalised(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::api::{LoopFile, Space};

    fn sample() -> StatusResponse {
        StatusResponse {
            pool_name: "p".into(),
            pool_mode: "loop".into(),
            data: Some(Space {
                used_bytes: 1 << 30,
                total_bytes: 4 << 30,
            }),
            metadata: Some(Space {
                used_bytes: 0,
                total_bytes: 1 << 20,
            }),
            read_only: true,
            snapshots_active: 3,
            loop_files: vec![LoopFile {
                role: "data".into(),
                file: "/var/lib/thinsnap/pool/data".into(),
                device: "/dev/loop0".into(),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn text_shows_space_health_and_counts() {
        let text = render(&sample(), false);
        assert!(
            text.contains("Data Space Used:           1.0 GiB (25.0%)"),
            "{text}"
        );
        assert!(
            text.contains("Data Space Available:      3.0 GiB"),
            "{text}"
        );
        assert!(
            text.contains("Health:                    read-only"),
            "{text}"
        );
        assert!(text.contains("3 active, 0 view, 0 committed"), "{text}");
        assert!(
            text.contains("Loop Data File:            /var/lib/thinsnap/pool/data on /dev/loop0"),
            "{text}"
        );
    }

    /// Every line of `docker info`'s devicemapper section has its counterpart (deploy/README.md,
    /// "Moving a node off the devicemapper driver", points here).
    #[test]
    fn text_covers_what_docker_info_showed_for_devicemapper() {
        let mut st = sample();
        st.block_size_bytes = 64 << 10;
        st.base_size_bytes = 10 << 30;
        st.fs_type = "xfs".into();
        st.min_free_space_percent = 10.0;
        st.remove_async = true;
        st.deleting_devices = 2;
        let text = render(&st, false);
        for want in [
            "Pool Name:                 p",
            "Pool Blocksize:            64.0 KiB",
            "Base Device Size:          10.0 GiB",
            "Backing Filesystem:        xfs",
            "Data Space Total:          4.0 GiB",
            "Metadata Space Used:       0 B",
            "Metadata Space Available:  1.0 MiB",
            "Minimum Free Space:        10% (409.6 MiB of data space",
            "Deferred Removal Enabled:  true",
            "Deferred Deletion Enabled: true",
            "Deferred Deleted Devices:  2",
            "Loop Data File:",
        ] {
            assert!(text.contains(want), "{want:?} missing from:\n{text}");
        }
        let v: serde_json::Value = serde_json::from_str(&render(&st, true)).expect("json");
        assert_eq!(v["deferred_removal"], true);
        assert_eq!(v["deferred_deletion"], true);
        assert_eq!(v["deleting_devices"], 2);
        assert_eq!(v["min_free_space_bytes"], (4u64 << 30) / 10);
        // The fields scripts already read keep their names.
        assert_eq!(v["pool_name"], "p");
        assert_eq!(v["min_free_space_percent"], 10.0);
    }

    #[test]
    fn json_has_the_numbers_scripts_read() {
        let v: serde_json::Value = serde_json::from_str(&render(&sample(), true)).expect("json");
        assert_eq!(v["data"]["available_bytes"], 3u64 << 30);
        assert_eq!(v["health"]["read_only"], true);
        assert_eq!(v["snapshots"]["active"], 3);
        assert_eq!(v["loop_files"][0]["device"], "/dev/loop0");
    }

    #[test]
    fn spares_are_shown_ready_over_target_or_off() {
        let mut st = sample();
        assert!(
            render(&st, false).contains("Warm Spares:               off"),
            "{}",
            render(&st, false)
        );
        st.spares_ready = 1;
        st.spares_target = 2;
        st.spares_taken = 5;
        st.spares_missed = 3;
        st.spare_thin_ids = vec![7, 9];
        let text = render(&st, false);
        assert!(
            text.contains("Warm Spares:               1 ready / 2 (taken 5, missed 3; cost: 1 active dm device(s), no pool data until taken)"),
            "{text}"
        );
        let v: serde_json::Value = serde_json::from_str(&render(&st, true)).expect("json");
        assert_eq!(
            (
                &v["spares"]["ready"],
                &v["spares"]["target"],
                &v["spares"]["taken"],
                &v["spares"]["missed"]
            ),
            (
                &serde_json::json!(1),
                &serde_json::json!(2),
                &serde_json::json!(5),
                &serde_json::json!(3)
            )
        );
        assert_eq!(v["spares"]["thin_ids"], serde_json::json!([7, 9]));
    }

    #[test]
    fn the_audit_of_thin_ids_is_shown() {
        let mut st = sample();
        assert!(render(&st, false).contains("Thin Id Audit:             not run yet"));
        st.audit_runs = 2;
        assert!(render(&st, false)
            .contains("Thin Id Audit:             the pool's thin ids are the store's (2 run(s))"));
        st.audit_unknown_thin_ids = vec![41, 42];
        st.audit_missing_thin_ids = vec![7];
        let text = render(&st, false);
        assert!(
            text.contains(
                "Thin Id Audit:             2 in the pool with no record, left alone (ids 41, 42); \
                 1 of ready records missing from the pool (ids 7) (2 run(s))"
            ),
            "{text}"
        );
        st.audit_error = "thin_ls missing".into();
        assert!(render(&st, false).contains("last audit failed: thin_ls missing"));
        let v: serde_json::Value = serde_json::from_str(&render(&st, true)).expect("json");
        assert_eq!(v["audit"]["unknown_thin_ids"], serde_json::json!([41, 42]));
        assert_eq!(v["audit"]["missing_thin_ids"], serde_json::json!([7]));
        assert_eq!(v["audit"]["runs"], 2);
        assert_eq!(v["audit"]["error"], "thin_ls missing");
    }

    #[test]
    fn an_unhealthy_pool_says_what_to_run() {
        let mut st = sample();
        // Read-only with room in its metadata: an error, repaired offline.
        let text = render(&st, false);
        assert!(
            text.contains("Action Needed:") && text.contains("thin_repair"),
            "{text}"
        );
        // Read-only with its metadata full: grow the metadata (loop: thinsnap's own command).
        st.metadata = Some(Space {
            used_bytes: 1 << 20,
            total_bytes: 1 << 20,
        });
        let a = action(&st).expect("an action");
        assert!(a.contains("thinsnap pool grow --metadata-size"), "{a}");
        st.pool_mode = "lvm".into();
        assert!(action(&st)
            .expect("an action")
            .contains("lvextend --poolmetadatasize"));
        let v: serde_json::Value = serde_json::from_str(&render(&st, true)).expect("json");
        assert!(v["health"]["action"]
            .as_str()
            .expect("action")
            .contains("lvextend"));
        // A healthy pool: no action line.
        st.read_only = false;
        assert!(action(&st).is_none());
        assert!(!render(&st, false).contains("Action Needed"));
    }
}
