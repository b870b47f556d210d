//! Access levels are derived, never edited: from a profile's transactions, grants and revokes,
//! at a given instant. This is the one place that decides who has access to what.
//!
//! Each transaction whose product maps to a level, and each grant, is a *source*: an interval
//! `[start, end)` (`end` `None` is lifetime). A refund ends a transaction's source at
//! `refunded_at`; a grace period extends a subscription's to `grace_period_expires_at`; a revoke
//! caps every source of its level that is older than the revoke (by write sequence) at
//! `revoke_at`, so a purchase or grant made after a revoke is untouched by it.
//! A level is active while some source is; its shown fields come from the source that gives the
//! latest expiry (lifetime wins), preferring active sources.

use crate::model::{App, Grant, ProductKind, ProfileState, PurchaseType, Revoke, Transaction};
use chrono::{DateTime, Utc};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Source<'a> {
    Transaction(&'a Transaction),
    Grant(&'a Grant),
}

/// One access level of a profile at an instant.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessLevelView<'a> {
    pub access_level_id: String,
    pub source: Source<'a>,
    /// When the shown source starts.
    pub starts_at: DateTime<Utc>,
    /// The earliest start of any source of the level.
    pub activated_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub is_active: bool,
    pub is_refund: bool,
    /// The shown source was cut short by a revoke.
    pub is_revoked: bool,
    pub is_in_grace_period: bool,
    pub will_renew: bool,
    pub renewal_cancelled_at: Option<DateTime<Utc>>,
    pub billing_issue_detected_at: Option<DateTime<Utc>>,
    pub cancellation_reason: Option<String>,
}

impl AccessLevelView<'_> {
    pub fn is_lifetime(&self) -> bool {
        self.expires_at.is_none()
    }

    pub fn transaction(&self) -> Option<&Transaction> {
        match self.source {
            Source::Transaction(t) => Some(t),
            Source::Grant(_) => None,
        }
    }
}

struct Candidate<'a> {
    level: &'a str,
    source: Source<'a>,
    start: DateTime<Utc>,
    end: Option<DateTime<Utc>>,
    revoked: bool,
}

impl Candidate<'_> {
    fn is_active(&self, now: DateTime<Utc>) -> bool {
        self.start <= now && self.end.is_none_or(|end| now < end)
    }

    /// Ordering for "the source that gives the latest expiry": active first, then the latest
    /// end (lifetime last), then the latest start.
    fn rank(&self, now: DateTime<Utc>) -> (bool, i64, i64) {
        (
            self.is_active(now),
            self.end.map_or(i64::MAX, |e| e.timestamp_micros()),
            self.start.timestamp_micros(),
        )
    }
}

/// The level a transaction grants, if its product is configured with one.
pub fn level_of<'a>(app: &'a App, transaction: &Transaction) -> Option<&'a str> {
    let product = app.product(&transaction.store, &transaction.store_product_id)?;
    if product.kind == ProductKind::Consumable {
        return None;
    }
    product.access_level_id.as_deref()
}

/// The interval a transaction gives access for: its period (grace included), cut at a refund.
pub fn transaction_interval(t: &Transaction) -> (DateTime<Utc>, Option<DateTime<Utc>>) {
    let mut end = match t.purchase_type {
        PurchaseType::Subscription => t.expires_at,
        PurchaseType::OneTimePurchase => None,
    };
    if let (Some(e), Some(grace)) = (end, t.grace_period_expires_at) {
        if grace > e {
            end = Some(grace);
        }
    }
    if let Some(refunded) = t.refunded_at {
        end = Some(end.map_or(refunded, |e| e.min(refunded)));
    }
    (t.purchased_at, end)
}

fn apply_revokes(candidate: &mut Candidate<'_>, seq: i64, revokes: &[Revoke]) {
    for revoke in revokes {
        if revoke.access_level_id != candidate.level || revoke.seq <= seq {
            continue;
        }
        if candidate.end.is_none_or(|end| revoke.revoke_at < end) {
            candidate.end = Some(revoke.revoke_at.max(candidate.start));
            candidate.revoked = true;
        }
    }
}

fn candidates<'a>(app: &'a App, state: &'a ProfileState) -> Vec<Candidate<'a>> {
    let doc = &state.profile.doc;
    let mut out = Vec::new();
    for t in &state.transactions {
        let Some(level) = level_of(app, t) else {
            continue;
        };
        let (start, end) = transaction_interval(t);
        let mut c = Candidate {
            level,
            source: Source::Transaction(t),
            start,
            end,
            revoked: false,
        };
        apply_revokes(&mut c, t.seq, &doc.revokes);
        out.push(c);
    }
    for g in &doc.grants {
        let mut c = Candidate {
            level: &g.access_level_id,
            source: Source::Grant(g),
            start: g.starts_at,
            end: g.expires_at,
            revoked: false,
        };
        apply_revokes(&mut c, g.seq, &doc.revokes);
        out.push(c);
    }
    out
}

/// Every access level the profile has ever had a source for, in id order, as at `now`.
pub fn derive<'a>(
    app: &'a App,
    state: &'a ProfileState,
    now: DateTime<Utc>,
) -> Vec<AccessLevelView<'a>> {
    let mut by_level: BTreeMap<&str, Vec<Candidate<'a>>> = BTreeMap::new();
    for c in candidates(app, state) {
        by_level.entry(c.level).or_default().push(c);
    }
    by_level
        .into_iter()
        .filter_map(|(level, group)| {
            let activated_at = group.iter().map(|c| c.start).min()?;
            let (best, is_active) = follow_coverage(group, now)?;
            Some(view(level, best, is_active, activated_at, now))
        })
        .collect()
}

fn view<'a>(
    level: &str,
    c: Candidate<'a>,
    is_active: bool,
    activated_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> AccessLevelView<'a> {
    let mut v = AccessLevelView {
        access_level_id: level.to_string(),
        source: c.source,
        starts_at: c.start,
        activated_at,
        expires_at: c.end,
        is_active,
        is_refund: false,
        is_revoked: c.revoked,
        is_in_grace_period: false,
        will_renew: false,
        renewal_cancelled_at: None,
        billing_issue_detected_at: None,
        cancellation_reason: c.revoked.then(|| "adapty_revoked".to_string()),
    };
    if let Source::Transaction(t) = c.source {
        let is_subscription = t.purchase_type == PurchaseType::Subscription;
        let renews = t.renew_status.unwrap_or(true);
        v.is_refund = t.is_refunded();
        v.billing_issue_detected_at = t.billing_issue_detected_at;
        v.is_in_grace_period = t.is_in_grace_period(now);
        v.will_renew = is_subscription
            && renews
            && is_active
            && !v.is_refund
            && !c.revoked
            && v.expires_at.is_some();
        v.renewal_cancelled_at = t.renewal_cancelled_at();
        if t.cancellation_reason.is_some() {
            v.cancellation_reason = t.cancellation_reason.clone();
        }
    }
    v
}

/// The best source; while the level is active, the one that ends its unbroken coverage (a
/// renewal or grant that starts before the current source ends extends the access).
/// Returns it with whether the level is active.
fn follow_coverage(
    mut group: Vec<Candidate<'_>>,
    now: DateTime<Utc>,
) -> Option<(Candidate<'_>, bool)> {
    let best_index = (0..group.len()).max_by_key(|&i| group[i].rank(now))?;
    let mut best = group.swap_remove(best_index);
    if !best.is_active(now) {
        return Some((best, false));
    }
    while let Some(end) = best.end {
        let next = (0..group.len())
            .filter(|&i| group[i].start <= end && group[i].end.is_none_or(|e| e > end))
            .max_by_key(|&i| group[i].end.map_or(i64::MAX, |e| e.timestamp_micros()));
        match next {
            Some(i) => best = group.swap_remove(i),
            None => break,
        }
    }
    Some((best, true))
}

/// Every instant `now` is compared with in deriving the profile's access and the time-bound
/// flags shown beside it (grace periods): each source's possible starts and ends, a revoke's
/// cut included. A superset is harmless; a missing instant would let a stored answer outlive
/// its truth.
fn instants(state: &ProfileState) -> impl Iterator<Item = DateTime<Utc>> + '_ {
    let doc = &state.profile.doc;
    let transactions = state.transactions.iter().flat_map(|t| {
        [
            Some(t.purchased_at),
            t.expires_at,
            t.grace_period_expires_at,
            t.refunded_at,
        ]
    });
    let grants = doc
        .grants
        .iter()
        .flat_map(|g| [Some(g.starts_at), g.expires_at]);
    let revokes = doc.revokes.iter().map(|r| Some(r.revoke_at));
    transactions.chain(grants).chain(revokes).flatten()
}

/// The interval around `now` over which everything derived from `state` at an instant gives
/// the same answer as at `now`: from the latest instant at or before `now` (`None`: since
/// ever) to the first one after it, excluded (`None`: for ever). Every comparison with `now`
/// (`start <= now`, `now < end`) flips only at one of those instants.
pub fn steady_window(
    state: &ProfileState,
    now: DateTime<Utc>,
) -> (Option<DateTime<Utc>>, Option<DateTime<Utc>>) {
    let mut window = (None, None);
    for instant in instants(state) {
        if instant <= now {
            window.0 = window.0.max(Some(instant));
        } else {
            window.1 = Some(
                window
                    .1
                    .map_or(instant, |end: DateTime<Utc>| end.min(instant)),
            );
        }
    }
    window
}

/// Whether the profile has ever had a source for `level` (the precondition of a revoke).
pub fn has_ever_had(app: &App, state: &ProfileState, level: &str) -> bool {
    candidates(app, state).iter().any(|c| c.level == level)
}

/// Whether `level` is active at `now`.
pub fn is_active(app: &App, state: &ProfileState, level: &str, now: DateTime<Utc>) -> bool {
    candidates(app, state)
        .iter()
        .any(|c| c.level == level && c.is_active(now))
}

#[cfg(test)]
mod tests;
