//! Watches policy files/directories and the workloads file (`notify`) and asks the agent to
//! reload, debounced, so an editor's write-rename dance or a Kubernetes ConfigMap's symlink
//! swap is one reload, applied well within a second.
//!
//! Files are watched through their parent directory: an atomic replace (rename over the file)
//! would otherwise leave the watch on the old, unlinked inode.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;
use tracing::warn;

/// How long to wait for more events after the first before reloading.
pub const DEBOUNCE: Duration = Duration::from_millis(150);

/// A running watcher; dropping it stops watching.
pub struct PolicyWatcher {
    _watcher: notify::RecommendedWatcher,
}

/// Starts watching `paths`; every burst of relevant changes sends one `()` on the returned
/// channel.
pub fn watch(paths: &[PathBuf]) -> notify::Result<(PolicyWatcher, mpsc::Receiver<()>)> {
    let (raw_tx, mut raw_rx) = mpsc::unbounded_channel::<()>();
    let targets: Vec<PathBuf> = paths
        .iter()
        .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()))
        .collect();
    let relevant = targets.clone();
    let mut watcher =
        notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
            Ok(ev) => {
                if ev.kind.is_access() {
                    return;
                }
                if ev.paths.iter().any(|p| {
                    relevant
                        .iter()
                        .any(|t| p.starts_with(t) || t.starts_with(p) || same_parent_entry(p, t))
                }) {
                    let _ = raw_tx.send(());
                }
            }
            Err(e) => warn!(error = %e, "policy watch error"),
        })?;
    for t in &targets {
        if t.is_dir() {
            watcher.watch(t, RecursiveMode::Recursive)?;
        } else {
            let dir = t.parent().unwrap_or(Path::new("/"));
            watcher.watch(dir, RecursiveMode::NonRecursive)?;
        }
    }
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        while raw_rx.recv().await.is_some() {
            // Debounce: swallow the rest of the burst.
            loop {
                match tokio::time::timeout(DEBOUNCE, raw_rx.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            // A full channel already holds a pending reload: nothing to add.
            let _ = tx.try_send(());
        }
    });
    Ok((PolicyWatcher { _watcher: watcher }, rx))
}

/// An event on `<dir>/<name>` where the watched target is `<dir>/<name>` too, compared by file
/// name (the target may have been replaced, so canonical paths can differ).
fn same_parent_entry(event: &Path, target: &Path) -> bool {
    event.parent() == target.parent() && event.file_name() == target.file_name()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn atomic_replace_and_directory_changes_trigger_one_reload_each() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.yaml");
        std::fs::write(&file, "a").unwrap();
        let sub = dir.path().join("policies");
        std::fs::create_dir(&sub).unwrap();
        let (_w, mut rx) = watch(&[file.clone(), sub.clone()]).unwrap();

        // Write to a temp file, rename over the watched one (what editors and the harness do).
        let tmp = dir.path().join(".p.yaml.tmp");
        std::fs::write(&tmp, "b").unwrap();
        std::fs::rename(&tmp, &file).unwrap();
        tokio::time::timeout(Duration::from_secs(2), rx.recv())
            .await
            .expect("reload after replace");

        std::fs::write(sub.join("new.yaml"), "c").unwrap();
        tokio::time::timeout(Duration::from_secs(2), rx.recv())
            .await
            .expect("reload after a new file in a dir");

        // An unrelated file next to the watched one does not trigger.
        std::fs::write(dir.path().join("unrelated.txt"), "x").unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(500), rx.recv())
                .await
                .is_err()
        );
    }
}
