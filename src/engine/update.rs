//! Update: [`Engine::update`], a snapshot's labels (its only mutable field).

use std::collections::BTreeMap;

use super::limits::{check_field_paths, check_key, check_labels};
use super::{now_ns, Engine, EngineError, SnapshotInfo};

impl Engine {
    /// Updates the labels of a snapshot, the only mutable field. `paths` empty replaces all
    /// labels; `labels` replaces all; `labels.<k>` sets or (absent from `labels`) removes one.
    ///
    /// Returns NotFound if it does not exist, InvalidArgument for any other field path, more
    /// than [`super::MAX_FIELD_PATHS`] paths, or labels (the request's or the result) beyond the limits
    /// (checked before the snapshot is read).
    pub async fn update(
        &self,
        key: &str,
        labels: BTreeMap<String, String>,
        paths: &[String],
    ) -> Result<SnapshotInfo, EngineError> {
        check_key("name", key)?;
        // Everything the request carries is checked before any lock, read or copy: the paths
        // (their number and that each is a label) and the labels themselves.
        let replace_all = check_field_paths(key, paths)?;
        check_labels(&labels)?;
        let _guard = self.locks.lock(&[key]).await;
        let rec = self.ready(key)?;
        // "labels" anywhere among the paths makes the request's labels the snapshot's: every
        // `labels.<key>` then sets or removes a label to what the request has, which it already
        // is. Otherwise each `labels.<key>` sets or removes one. Either way no label map is
        // copied per path.
        let new_labels = if paths.is_empty() || replace_all {
            labels
        } else {
            let mut new_labels = rec.labels;
            for path in paths {
                let l = path
                    .strip_prefix("labels.")
                    .expect("checked by check_field_paths");
                match labels.get(l) {
                    Some(v) => {
                        new_labels.insert(l.to_string(), v.clone());
                    }
                    None => {
                        new_labels.remove(l);
                    }
                }
            }
            new_labels
        };
        check_labels(&new_labels)?;
        let rec = self.store.set_labels(key, new_labels, now_ns())?;
        self.flush().await?;
        Ok(Self::info_of(key, &rec))
    }
}
