//! `subgate copy-store`: the upgrade path from one database to another (SQLite to PostgreSQL,
//! or back). Rows are copied as they are (ids, versions, timestamps and transaction order), so
//! every profile reads the same from both stores afterwards. Events keep their `seq` and
//! delivery state: the feed's cursors stay valid, and webhooks still pending are sent by the
//! new store's nodes.

use crate::http::rendered::RenderedProfiles;
use anyhow::{bail, Context as _};
use chrono::{DateTime, SubsecRound, Utc};
use std::sync::Arc;
use subgate_core::model::App;
use subgate_core::service::ProfileRenderer;
use subgate_core::store::{Counts, ImportedProfile, Store};

/// Profiles per import transaction: large enough to amortise commits, small enough to keep
/// memory flat on millions of profiles.
const PAGE: u32 = 500;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CopyReport {
    pub apps: u64,
    pub profiles: u64,
    pub transactions: u64,
    pub detached_transactions: u64,
    pub events: u64,
}

/// Copies everything `from` holds into `to`. Refuses a target that already holds profiles,
/// transactions or events unless `overwrite` (then rows with the same keys are replaced; an
/// event of the target whose `seq` a source event has fails the copy). Each profile is stored
/// with its answer to a read as rendered at `now` against the source's apps.
pub async fn copy_store(
    from: &dyn Store,
    to: &dyn Store,
    overwrite: bool,
    now: DateTime<Utc>,
) -> anyhow::Result<CopyReport> {
    let before = to.counts().await.context("counting the target's rows")?;
    if (before.profiles > 0 || before.transactions > 0 || before.events > 0) && !overwrite {
        bail!(
            "the target already holds {} profiles, {} transactions and {} events; pass \
             --overwrite to copy into it anyway (rows with the same keys are replaced)",
            before.profiles,
            before.transactions,
            before.events
        );
    }
    let source = from.counts().await.context("counting the source's rows")?;
    let mut report = CopyReport::default();

    let apps = from.apps().await.context("reading the source's apps")?;
    to.put_apps(&apps).await.context("writing the apps")?;
    report.apps = apps.len() as u64;
    let apps: Vec<Arc<App>> = apps.into_iter().map(|a| Arc::new(App::new(a))).collect();
    let renderer = RenderedProfiles::new(&apps);
    let now = now.trunc_subsecs(6);

    let mut after = None;
    loop {
        let page = from
            .profiles_after(after, PAGE)
            .await
            .context("reading profiles")?;
        let Some(last) = page.last() else { break };
        after = Some((last.profile.app_id, last.profile.id));
        report.profiles += page.len() as u64;
        report.transactions += page
            .iter()
            .map(|p| p.transactions.len() as u64)
            .sum::<u64>();
        let page = page
            .into_iter()
            .map(|state| ImportedProfile {
                rendered: renderer.render(&state, now),
                state,
            })
            .collect();
        to.import(page, Vec::new())
            .await
            .context("writing profiles")?;
    }

    let mut after = None;
    loop {
        let page = from
            .detached_after(after, PAGE)
            .await
            .context("reading detached transactions")?;
        let Some(last) = page.last() else { break };
        after = Some(last.transaction.id);
        report.detached_transactions += page.len() as u64;
        to.import(Vec::new(), page)
            .await
            .context("writing detached transactions")?;
    }

    let mut after = None;
    loop {
        let page = from
            .events_after(after, PAGE)
            .await
            .context("reading events")?;
        let Some(last) = page.last() else { break };
        after = Some(last.seq);
        report.events += page.len() as u64;
        to.import_events(page).await.context("writing events")?;
    }

    to.after_bulk_load()
        .await
        .context("refreshing the target's statistics")?;
    let copied = report.transactions + report.detached_transactions;
    if report.profiles != source.profiles
        || copied != source.transactions
        || report.events != source.events
    {
        bail!(
            "the source changed during the copy (it had {} profiles, {} transactions and {} \
             events; {}, {} and {} were copied); stop every node writing to it and copy again \
             with --overwrite",
            source.profiles,
            source.transactions,
            source.events,
            report.profiles,
            copied,
            report.events
        );
    }
    if !overwrite {
        let after = to.counts().await.context("counting the target's rows")?;
        let expected = Counts {
            apps: after.apps,
            profiles: source.profiles,
            transactions: source.transactions,
            events: source.events,
        };
        if after != expected {
            bail!("the target holds {after:?} after the copy, expected {expected:?}");
        }
    }
    Ok(report)
}
