//! `thinsnap ls`: the Admin service's inventory as a table or JSON, its filters (kind, state)
//! and the reverse lookup from a dm device name or a thin id to what owns it. Pure formatting
//! and selection: it asks nothing.

use crate::admin::api::{InventoryEntry, InventoryResponse};
use crate::status::human;

/// The kinds `--kind` takes.
pub const KINDS: &[&str] = &["active", "view", "committed", "spare", "base"];
/// The states `--state` takes (`inactive` takes awaiting-activation too).
pub const STATES: &[&str] = &["active", "inactive", "quarantined", "unowned"];

/// What `thinsnap ls` selects.
#[derive(Debug, Clone, Default)]
pub struct Select {
    pub kind: Option<String>,
    pub state: Option<String>,
}

impl Select {
    /// Whether `e` passes the filters.
    pub fn admits(&self, e: &InventoryEntry) -> bool {
        let kind = self.kind.as_deref().is_none_or(|k| e.kind == k);
        let state = self.state.as_deref().is_none_or(|s| match s {
            "inactive" => e.state == "inactive" || e.state == "awaiting-activation",
            s => e.state == s,
        });
        kind && state
    }
}

/// What a reverse lookup looks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    Device(String),
    ThinId(u32),
}

/// Finds what owns the device or thin id `what`.
///
/// Returns the entry if a snapshot, a spare or the base owns it; an error naming it otherwise,
/// saying whether it is the pool's but no record's (unowned, foreign) or not found at all.
pub fn lookup<'a>(inv: &'a InventoryResponse, what: &Lookup) -> Result<&'a InventoryEntry, String> {
    let found = inv.entries.iter().find(|e| match what {
        Lookup::Device(name) => e.device == *name,
        Lookup::ThinId(id) => e.has_thin_id && e.thin_id == *id,
    });
    let named = match what {
        Lookup::Device(name) => format!("dm device {name}"),
        Lookup::ThinId(id) => format!("thin id {id}"),
    };
    match found {
        Some(e) if e.kind == "unowned" || e.kind == "foreign" => Err(format!(
            "{named} of pool {} is owned by no snapshot ({}): {}",
            inv.pool_name, e.kind, e.note
        )),
        Some(e) => Ok(e),
        None => {
            let unsure = if inv.thin_ids_listed {
                String::new()
            } else {
                format!(
                    " (the pool's thin ids could not be listed: {}; an inactive thin id no \
                     record owns is not seen)",
                    inv.thin_ids_error
                )
            };
            Err(format!(
                "{named} not found: no snapshot, spare or base of pool {} has it, and the pool \
                 has no such device{unsure}",
                inv.pool_name
            ))
        }
    }
}

fn entry_json(e: &InventoryEntry) -> serde_json::Value {
    let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
    serde_json::json!({
        "kind": e.kind,
        "key": opt(&e.key),
        "parent": opt(&e.parent),
        "thin_id": e.has_thin_id.then_some(e.thin_id),
        "device": opt(&e.device),
        "state": e.state,
        "note": opt(&e.note),
        "size_bytes": (e.size_bytes != 0).then_some(e.size_bytes),
        "mapped_bytes": e.mapped_known.then_some(e.mapped_bytes),
        "mapped_source": opt(&e.mapped_source),
        "in_pool": match e.in_pool.as_str() {
            "yes" => Some(true),
            "no" => Some(false),
            _ => None,
        },
    })
}

/// One entry as JSON (a reverse lookup's answer).
pub fn render_entry_json(e: &InventoryEntry) -> String {
    serde_json::to_string_pretty(&entry_json(e)).expect("a JSON value always serializes") + "\n"
}

/// The entries `select` admits, as a table or (with `json`) as JSON.
pub fn render(inv: &InventoryResponse, select: &Select, json: bool) -> String {
    let entries: Vec<&InventoryEntry> = inv.entries.iter().filter(|e| select.admits(e)).collect();
    if json {
        let v = serde_json::json!({
            "pool": inv.pool_name,
            "thin_ids_listed": inv.thin_ids_listed,
            "thin_ids_error": (!inv.thin_ids_error.is_empty()).then_some(&inv.thin_ids_error),
            "entries": entries.iter().map(|e| entry_json(e)).collect::<Vec<_>>(),
        });
        return serde_json::to_string_pretty(&v).expect("a JSON value always serializes") + "\n";
    }
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_string()
        } else {
            s.to_string()
        }
    };
    let rows: Vec<[String; 9]> = entries
        .iter()
        .map(|e| {
            [
                e.kind.clone(),
                e.state.clone(),
                if e.has_thin_id {
                    e.thin_id.to_string()
                } else {
                    "-".into()
                },
                dash(&e.device),
                if e.size_bytes == 0 {
                    "-".into()
                } else {
                    human(e.size_bytes)
                },
                if e.mapped_known {
                    human(e.mapped_bytes)
                } else {
                    "unknown".into()
                },
                dash(&e.key),
                dash(&e.parent),
                dash(&e.note),
            ]
        })
        .collect();
    let head = [
        "KIND", "STATE", "THIN", "DEVICE", "SIZE", "MAPPED", "KEY", "PARENT", "NOTE",
    ];
    let mut width = head.map(str::len);
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = width[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(&head.map(String::from));
    for r in &rows {
        out.push_str(&line(r));
    }
    if !inv.thin_ids_listed {
        out.push_str(&format!(
            "note: the pool's thin ids could not be listed ({}): unowned thin ids without a dm \
             device are not shown\n",
            inv.thin_ids_error
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(kind: &str, state: &str, id: u32, device: &str, key: &str) -> InventoryEntry {
        InventoryEntry {
            kind: kind.into(),
            state: state.into(),
            has_thin_id: true,
            thin_id: id,
            device: device.into(),
            key: key.into(),
            in_pool: "yes".into(),
            ..Default::default()
        }
    }

    fn inv() -> InventoryResponse {
        InventoryResponse {
            pool_name: "tp".into(),
            thin_ids_listed: true,
            entries: vec![
                entry("active", "active", 3, "tp-snap-3", "a"),
                entry("view", "awaiting-activation", 4, "tp-snap-4", "v"),
                entry("committed", "inactive", 2, "tp-snap-2", "c"),
                entry("active", "quarantined", 5, "tp-snap-5", "q"),
                entry("base", "active", 1, "tp-snap-1", ""),
                entry("unowned", "unowned", 77, "", ""),
                entry("unowned", "unowned", 78, "tp-snap-78", ""),
            ],
            ..Default::default()
        }
    }

    fn keys(inv: &InventoryResponse, s: Select) -> Vec<u32> {
        inv.entries
            .iter()
            .filter(|e| s.admits(e))
            .map(|e| e.thin_id)
            .collect()
    }

    #[test]
    fn filters_by_kind_and_state() {
        let inv = inv();
        let sel = |k: Option<&str>, s: Option<&str>| Select {
            kind: k.map(String::from),
            state: s.map(String::from),
        };
        assert_eq!(keys(&inv, sel(Some("active"), None)), vec![3, 5]);
        assert_eq!(keys(&inv, sel(None, Some("inactive"))), vec![4, 2]);
        assert_eq!(keys(&inv, sel(None, Some("unowned"))), vec![77, 78]);
        assert_eq!(
            keys(&inv, sel(Some("active"), Some("quarantined"))),
            vec![5]
        );
        assert_eq!(keys(&inv, sel(Some("base"), None)), vec![1]);
        let table = render(&inv, &sel(None, Some("quarantined")), false);
        assert_eq!(table.lines().count(), 2, "{table}");
        assert!(table.contains("tp-snap-5"), "{table}");
    }

    #[test]
    fn reverse_lookup_tells_unowned_from_not_found() {
        let inv = inv();
        let e = lookup(&inv, &Lookup::Device("tp-snap-4".into())).expect("v");
        assert_eq!(e.key, "v");
        let e = lookup(&inv, &Lookup::ThinId(2)).expect("c");
        assert_eq!(e.key, "c");
        let err = lookup(&inv, &Lookup::Device("tp-snap-78".into())).expect_err("unowned");
        assert!(
            err.contains("dm device tp-snap-78") && err.contains("owned by no snapshot"),
            "{err}"
        );
        let err = lookup(&inv, &Lookup::ThinId(77)).expect_err("unowned");
        assert!(
            err.contains("thin id 77") && err.contains("unowned"),
            "{err}"
        );
        let err = lookup(&inv, &Lookup::ThinId(4711)).expect_err("not found");
        assert!(
            err.contains("thin id 4711 not found") && !err.contains("owned by"),
            "{err}"
        );
        let err = lookup(&inv, &Lookup::Device("tp-snap-4711".into())).expect_err("none");
        assert!(err.contains("dm device tp-snap-4711 not found"), "{err}");
    }

    #[test]
    fn json_says_unknown_as_null() {
        let mut inv = inv();
        inv.entries[0].mapped_known = true;
        inv.entries[0].mapped_bytes = 4096;
        let v: serde_json::Value =
            serde_json::from_str(&render(&inv, &Select::default(), true)).expect("json");
        let e = &v["entries"];
        assert_eq!(e[0]["mapped_bytes"], 4096);
        assert_eq!(e[1]["mapped_bytes"], serde_json::Value::Null);
        assert_eq!(e[5]["device"], serde_json::Value::Null);
        assert_eq!(e.as_array().expect("array").len(), 7);
    }
}
