//! Test hooks of the warm spares: a pause between a spare's intent and its thin-id lock, the
//! refiller run to idle, and what is ready per parent.

use super::Step;
use crate::engine::Engine;
use crate::model::ThinId;

impl Engine {
    /// Pauses the next spare made of thin id `origin`, between its intent (flushed) and its
    /// thin-id lock: the returned receiver gets its thin id once it is there; it goes on when
    /// the sender is used or dropped.
    pub(in crate::engine) fn pause_spare_after_intent(
        &self,
        origin: ThinId,
    ) -> (
        tokio::sync::oneshot::Receiver<ThinId>,
        tokio::sync::oneshot::Sender<()>,
    ) {
        let (at_tx, at_rx) = tokio::sync::oneshot::channel();
        let (go_tx, go_rx) = tokio::sync::oneshot::channel();
        *self
            .spares
            .pause_after_intent
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some((origin, at_tx, go_rx));
        (at_rx, go_tx)
    }

    pub(super) async fn paused_after_intent(&self, id: ThinId, origin: ThinId) {
        let pause = {
            let mut slot = self
                .spares
                .pause_after_intent
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match slot.take() {
                Some(p) if p.0 == origin => Some(p),
                other => {
                    *slot = other;
                    None
                }
            }
        };
        if let Some((_, at, go)) = pause {
            let _ = at.send(id);
            let _ = go.await;
        }
    }

    /// Runs the refiller's rounds until it has nothing to do; returns how many it ran.
    pub(in crate::engine) async fn refill_until_idle(&self) -> usize {
        let mut rounds = 0;
        while let Step::Again = self.refill_step().await.expect("refill") {
            rounds += 1;
            assert!(rounds < 1000, "the refiller never settles");
        }
        rounds
    }

    /// The thin id of the oldest ready spare of `parent` (`""`: the base), if any.
    pub(in crate::engine) fn spare_of(&self, parent: &str) -> Option<ThinId> {
        self.spares
            .inner()
            .ready
            .get(parent)
            .and_then(|v| v.first())
            .map(|s| s.id)
    }

    /// How many spares of `parent` are ready.
    pub(in crate::engine) fn spares_of(&self, parent: &str) -> usize {
        self.spares.inner().ready_of(parent)
    }
}
