//! Turns the raw feed of [`ResourceSet`]s into debounced [`Published`] snapshots, computing once
//! (not once per stream) which names changed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::resources::ResourceSet;

/// A debounced configuration, as every stream sees it.
#[derive(Debug)]
pub(crate) struct Published {
    /// Increments by one per publication; streams that skipped one recompute in full.
    pub generation: u64,
    /// The resources.
    pub set: Arc<ResourceSet>,
    /// Names changed since generation `generation - 1`, per type URL.
    pub changes: BTreeMap<String, BTreeSet<String>>,
    /// When the first feed change folded into this publication happened.
    pub changed_at: Instant,
}

/// Publishes the feed's current value now, then every change until `shutdown` or until the
/// feed's sender is dropped.
///
/// A change after a quiet period (nothing published for `debounce`) is published at once: a lone
/// pod update reaches proxies without waiting. Changes that follow it are debounced: published
/// once the feed is quiet for `debounce`, and never later than `max_debounce` after the first of
/// them, so a rollout costs a handful of publications, not one per pod.
pub(crate) fn spawn(
    mut feed: watch::Receiver<Arc<ResourceSet>>,
    debounce: Duration,
    max_debounce: Duration,
    shutdown: CancellationToken,
) -> watch::Receiver<Arc<Published>> {
    let initial = Published {
        generation: 0,
        set: feed.borrow_and_update().clone(),
        changes: BTreeMap::new(),
        changed_at: Instant::now(),
    };
    let (tx, rx) = watch::channel(Arc::new(initial));
    tokio::spawn(async move {
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = run(&mut feed, &tx, debounce, max_debounce) => {}
        }
        tracing::debug!("xds feed debouncer stopped");
    });
    rx
}

async fn run(
    feed: &mut watch::Receiver<Arc<ResourceSet>>,
    tx: &watch::Sender<Arc<Published>>,
    debounce: Duration,
    max_debounce: Duration,
) {
    let mut published_at: Option<Instant> = None;
    loop {
        if feed.changed().await.is_err() {
            return;
        }
        feed.borrow_and_update();
        let first = Instant::now();
        if published_at.is_none_or(|at| first.duration_since(at) >= debounce) {
            let set = feed.borrow().clone();
            publish(tx, set, first);
            published_at = Some(first);
            continue;
        }
        let mut last = first;
        let mut open = true;
        // Wait for a quiet period of `debounce`, but never longer than `max_debounce` in total,
        // so a steady trickle of changes cannot starve proxies.
        while open {
            let deadline = (last + debounce).min(first + max_debounce);
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => break,
                changed = feed.changed() => match changed {
                    Ok(()) => {
                        feed.borrow_and_update();
                        last = Instant::now();
                    }
                    Err(_) => open = false,
                },
            }
        }
        let set = feed.borrow().clone();
        publish(tx, set, first);
        published_at = Some(Instant::now());
        if !open {
            return;
        }
    }
}

fn publish(tx: &watch::Sender<Arc<Published>>, set: Arc<ResourceSet>, changed_at: Instant) {
    let previous = tx.borrow().clone();
    let changes = set.changes_since(&previous.set);
    if changes.is_empty() {
        tracing::debug!("feed change left every resource as it was");
        return;
    }
    let changed: usize = changes.values().map(BTreeSet::len).sum();
    let generation = previous.generation + 1;
    tracing::debug!(generation, changed, "publishing xds configuration");
    tx.send_replace(Arc::new(Published {
        generation,
        set,
        changes,
        changed_at,
    }));
}

#[cfg(test)]
mod tests {
    use mesh_proto::any::AUTHORIZATION_TYPE_URL;
    use prost_types::Any;

    use super::*;

    fn with(names: &[&str]) -> Arc<ResourceSet> {
        let mut set = ResourceSet::new();
        for name in names {
            let body = Any {
                type_url: AUTHORIZATION_TYPE_URL.into(),
                value: name.as_bytes().to_vec(),
            };
            set.insert(AUTHORIZATION_TYPE_URL, name.to_string(), body);
        }
        Arc::new(set)
    }

    #[tokio::test(start_paused = true)]
    async fn bursts_coalesce_and_max_debounce_bounds_the_wait() {
        let (tx, rx) = watch::channel(with(&[]));
        let debounce = Duration::from_millis(100);
        let max = Duration::from_secs(1);
        let mut out = spawn(rx, debounce, max, CancellationToken::new());
        assert_eq!(out.borrow_and_update().generation, 0);

        // Three changes 10 ms apart after a quiet start: the first is published at once, the
        // other two together, 100 ms after the last.
        let start = Instant::now();
        tx.send_replace(with(&["a"]));
        out.changed().await.unwrap();
        let published = out.borrow_and_update().clone();
        assert_eq!((published.generation, published.changed_at), (1, start));
        assert_eq!(start.elapsed(), Duration::ZERO);
        for names in [&["a", "b"][..], &["a", "b", "c"]] {
            tokio::time::sleep(Duration::from_millis(10)).await;
            tx.send_replace(with(names));
        }
        out.changed().await.unwrap();
        let published = out.borrow_and_update().clone();
        assert_eq!(published.generation, 2);
        assert_eq!(published.changes[AUTHORIZATION_TYPE_URL].len(), 2);
        assert_eq!(published.changed_at, start + Duration::from_millis(10));
        assert_eq!(start.elapsed(), Duration::from_millis(120));

        // A change every 50 ms never goes quiet, yet is published after max_debounce.
        let start = Instant::now();
        let writer = tokio::spawn(async move {
            for i in 0..40 {
                tx.send_replace(with(&[&format!("n{i}")]));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        out.changed().await.unwrap();
        let waited = start.elapsed();
        assert!(waited >= max && waited < max + debounce, "{waited:?}");
        writer.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn identical_sets_are_not_published_and_closing_the_feed_stops() {
        let (tx, rx) = watch::channel(with(&["a"]));
        let mut out = spawn(
            rx,
            Duration::from_millis(100),
            Duration::from_secs(1),
            CancellationToken::new(),
        );
        out.borrow_and_update();
        // Same content in a new set: nothing to publish.
        tx.send_replace(with(&["a"]));
        let quiet = tokio::time::timeout(Duration::from_secs(5), out.changed()).await;
        assert!(quiet.is_err(), "an identical set must not be published");
        tx.send_replace(with(&["a", "b"]));
        drop(tx);
        // The pending change is still published, then the debouncer ends.
        out.changed().await.unwrap();
        assert_eq!(out.borrow_and_update().generation, 1);
        assert!(out.changed().await.is_err());
    }
}
