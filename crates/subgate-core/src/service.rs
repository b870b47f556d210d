//! The use cases. Each loads through the [`Store`], decides with pure domain functions and
//! hands the store one atomic change.

use crate::access;
use crate::attributes::{self, AttributeChange};
use crate::clock::Clock;
use crate::currency::Rates;
use crate::error::{ApiError, ErrorCode};
use crate::events::{EventBuilder, NewEvent};
use crate::model::{
    App, Grant, GrantPurchase, Offer, Price, Profile, ProfileDoc, ProfileFields, ProfileKey,
    ProfileState, PurchaseType, Revoke, Transaction,
};
use crate::store::{
    ChainRef, Change, Decide, DueExpiry, Loaded, Lookup, Outcome, Store, StoreError, WriteError,
};
use crate::time;
use crate::transaction::{self, TransactionInput};
use chrono::{DateTime, NaiveDate, SubsecRound, Utc};
use std::borrow::Borrow;
use std::sync::Arc;
use uuid::Uuid;

/// How a request names its user: at least one of the two.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub profile_id: Option<Uuid>,
    pub customer_user_id: Option<String>,
}

impl Identity {
    /// The key a read goes by: the profile id when given.
    pub fn key(&self) -> ProfileKey {
        match (&self.profile_id, &self.customer_user_id) {
            (Some(id), _) => ProfileKey::Id(*id),
            (None, Some(cuid)) => ProfileKey::CustomerUserId(cuid.clone()),
            (None, None) => ProfileKey::CustomerUserId(String::new()),
        }
    }

    /// A create loads by both names: the profile, and whoever holds the customer user id.
    fn upsert_lookup(&self) -> Lookup {
        Lookup {
            profile_id: self.profile_id,
            customer_user_id: self.customer_user_id.clone(),
            chain: None,
        }
    }

    /// Writes that must find an existing profile look it up the way a read does.
    fn existing_lookup(&self) -> Lookup {
        match self.key() {
            ProfileKey::Id(id) => Lookup {
                profile_id: Some(id),
                ..Lookup::default()
            },
            ProfileKey::CustomerUserId(cuid) => Lookup {
                customer_user_id: Some(cuid),
                ..Lookup::default()
            },
        }
    }
}

/// A field of a partial update: left out, cleared with null, or set.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Patch<T> {
    #[default]
    Keep,
    Clear,
    Set(T),
}

impl<T: Clone> Patch<T> {
    fn apply(&self, target: &mut Option<T>) {
        match self {
            Patch::Keep => {}
            Patch::Clear => *target = None,
            Patch::Set(v) => *target = Some(v.clone()),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct FieldsPatch {
    pub first_name: Patch<String>,
    pub last_name: Patch<String>,
    pub gender: Patch<String>,
    pub email: Patch<String>,
    pub phone_number: Patch<String>,
    pub birthday: Patch<NaiveDate>,
    pub ip_country: Patch<String>,
    pub ip_v4_address: Patch<String>,
    pub store_country: Patch<String>,
    pub store: Patch<String>,
    pub analytics_disabled: Patch<bool>,
    pub att_status: Patch<i64>,
    pub store_account_token: Patch<String>,
}

impl FieldsPatch {
    fn apply(&self, f: &mut ProfileFields) {
        self.first_name.apply(&mut f.first_name);
        self.last_name.apply(&mut f.last_name);
        self.gender.apply(&mut f.gender);
        self.email.apply(&mut f.email);
        self.phone_number.apply(&mut f.phone_number);
        self.birthday.apply(&mut f.birthday);
        self.ip_country.apply(&mut f.ip_country);
        self.ip_v4_address.apply(&mut f.ip_v4_address);
        self.store_country.apply(&mut f.store_country);
        self.store.apply(&mut f.store);
        self.analytics_disabled.apply(&mut f.analytics_disabled);
        self.att_status.apply(&mut f.att_status);
        self.store_account_token.apply(&mut f.store_account_token);
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProfileUpdate {
    pub fields: FieldsPatch,
    pub attributes: Option<Vec<AttributeChange>>,
    pub installation_meta: Option<serde_json::Map<String, serde_json::Value>>,
    pub platform: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GrantInput {
    pub access_level_id: String,
    pub starts_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RevokeInput {
    pub access_level_id: String,
    /// `None`: now.
    pub revoke_at: Option<DateTime<Utc>>,
}

/// How long a v1 grant lasts, by the v1 priority: lifetime, then a date, then days.
#[derive(Debug, Clone, PartialEq)]
pub enum GrantLength {
    Lifetime,
    Until(DateTime<Utc>),
    /// Added to the level's current expiry, or to now when it is not active.
    Days(i64),
}

/// A v1 grant: a length, an optional start, and optionally the store purchase it stands for
/// (recorded as a transaction when it names a transaction id).
#[derive(Debug, Clone, PartialEq)]
pub struct GrantV1Input {
    pub access_level_id: String,
    pub length: GrantLength,
    pub starts_at: Option<DateTime<Utc>>,
    pub purchase: Option<GrantPurchase>,
    pub price: Option<Price>,
}

/// Which error an unknown profile is on a given route.
#[derive(Debug, Clone, Copy)]
enum Missing {
    /// Profile routes: 404 `not_found`.
    NotFound,
    /// Purchase routes: 400 `profile_does_not_exist`.
    ProfileDoesNotExist,
}

impl Missing {
    fn error(self) -> ApiError {
        match self {
            Missing::NotFound => ApiError::new(ErrorCode::NotFound),
            Missing::ProfileDoesNotExist => ApiError::new(ErrorCode::ProfileDoesNotExist),
        }
    }
}

/// Makes a profile's answer to a read at each write, for the store to keep beside the profile:
/// a read can then send it without decoding the profile and rendering it again. The bytes are
/// opaque to the store; the renderer also judges, at read time, whether they still hold.
pub trait ProfileRenderer: Send + Sync {
    /// `None` when the profile's app is unknown to this node.
    fn render(&self, state: &ProfileState, now: DateTime<Utc>) -> Option<Vec<u8>>;
}

#[derive(Clone)]
pub struct Services {
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub rates: Arc<Rates>,
    /// Without one, profiles are stored without an answer and every read renders its own.
    pub renderer: Option<Arc<dyn ProfileRenderer>>,
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) => ApiError::new(ErrorCode::ServiceUnavailable),
            StoreError::Internal(_) => ApiError::new(ErrorCode::InternalServerError),
        }
    }
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Rejected(api) => api,
            WriteError::Store(store) => {
                tracing::error!(error = %store, "write failed");
                store.into()
            }
        }
    }
}

/// A profile as a write left it, with the answer to a read the write stored beside it, if it
/// stored one (see [`ProfileRenderer`]): the write's response can send that answer instead of
/// rendering the profile a second time. Derefs to the state.
#[derive(Debug, Clone)]
pub struct Written {
    pub state: Arc<ProfileState>,
    pub answer: Option<Vec<u8>>,
}

impl std::ops::Deref for Written {
    type Target = ProfileState;

    fn deref(&self) -> &ProfileState {
        &self.state
    }
}

fn saved(outcome: Outcome, missing: Missing) -> Result<Written, ApiError> {
    match outcome {
        Outcome::Saved { state, rendered } => Ok(Written {
            state,
            answer: rendered,
        }),
        Outcome::Kept(Some(state)) => Ok(Written {
            state,
            answer: None,
        }),
        Outcome::Kept(None) | Outcome::Deleted => Err(missing.error()),
    }
}

/// The loaded profile with its version bumped and `updated_at` moved: the start of every save.
fn next_version(state: &ProfileState, now: DateTime<Utc>) -> ProfileState {
    let mut next = state.clone();
    next.profile.version += 1;
    next.profile.updated_at = now;
    next
}

/// A profile about to be written for the first time (version 1 is an insert).
fn new_profile(
    id: Uuid,
    app_id: Uuid,
    customer_user_id: Option<String>,
    now: DateTime<Utc>,
) -> ProfileState {
    ProfileState {
        profile: Profile {
            id,
            app_id,
            customer_user_id,
            version: 1,
            created_at: now,
            updated_at: now,
            doc: ProfileDoc::default(),
        },
        transactions: Vec::new(),
    }
}

fn existing(loaded: &Loaded, missing: Missing) -> Result<&ProfileState, ApiError> {
    loaded.profile.as_deref().ok_or_else(|| missing.error())
}

impl Services {
    /// Microseconds are what both stores keep, so a saved state reads back exactly as it was
    /// written (the SQLite store caches what it wrote).
    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now().trunc_subsecs(6)
    }

    /// The profile's answer to a read as its last write stored it, if it has one (the
    /// renderer judges whether it still holds).
    pub async fn get_rendered_profile(
        &self,
        app: &App,
        who: &Identity,
    ) -> Result<Option<Vec<u8>>, ApiError> {
        self.store
            .load_rendered(app.id(), &who.key())
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "profile read failed");
                e.into()
            })
    }

    /// Stores the profile's answer as rendered now, after a read found the stored one missing
    /// or past its window; nothing if the profile changed since it was read. Answers whether it
    /// stored one.
    pub async fn renew_rendered(&self, state: &ProfileState) -> Result<bool, StoreError> {
        let Some(rendered) = self
            .renderer
            .as_ref()
            .and_then(|r| r.render(state, self.now()))
        else {
            return Ok(false);
        };
        let p = &state.profile;
        self.store
            .save_rendered(p.app_id, p.id, p.version, rendered)
            .await
    }

    pub async fn get_profile(
        &self,
        app: &App,
        who: &Identity,
    ) -> Result<Arc<ProfileState>, ApiError> {
        match self.store.load_profile(app.id(), &who.key()).await {
            Ok(Some(state)) => Ok(state),
            Ok(None) => Err(Missing::NotFound.error()),
            Err(e) => {
                tracing::error!(error = %e, "profile read failed");
                Err(e.into())
            }
        }
    }

    async fn write(
        &self,
        app: &App,
        lookup: Lookup,
        decide: Decide,
        missing: Missing,
    ) -> Result<Written, ApiError> {
        let outcome = self.store_write(app, lookup, decide).await?;
        saved(outcome, missing)
    }

    /// Every write of the services goes through here, so that every saved profile is stored
    /// with its answer to a read, rendered at the instant the write decided at.
    async fn store_write(
        &self,
        app: &App,
        lookup: Lookup,
        decide: Decide,
    ) -> Result<Outcome, WriteError> {
        let decide = match self.renderer.clone() {
            Some(renderer) => {
                let now = self.now();
                Box::new(move |loaded: &Loaded| {
                    let mut change = decide(loaded)?;
                    if let Change::Save {
                        state, rendered, ..
                    } = &mut change
                    {
                        *rendered = renderer.render(state, now);
                    }
                    Ok(change)
                })
            }
            None => decide,
        };
        self.store.write(app.id(), lookup, decide).await
    }

    /// Creates the profile, or updates it when it exists (a retried create must not fail).
    pub async fn upsert_profile(
        &self,
        app: &App,
        who: &Identity,
        update: ProfileUpdate,
    ) -> Result<Written, ApiError> {
        let now = self.now();
        let new_id = who.profile_id.unwrap_or_else(Uuid::now_v7);
        let app_id = app.id();
        let wanted_cuid = who.customer_user_id.clone();
        let decide: Decide = Box::new(move |loaded: &Loaded| {
            let mut next = match &loaded.profile {
                Some(state) => next_version(state, now),
                None => new_profile(new_id, app_id, None, now),
            };
            if let Some(cuid) = &wanted_cuid {
                if let Some(owner) = loaded.customer_user_id_owner {
                    if owner != next.profile.id {
                        return Err(ApiError::invalid(
                            "customer_user_id",
                            format!(
                                "Customer user id `{cuid}` already belongs to another profile."
                            ),
                        ));
                    }
                }
                next.profile.customer_user_id = Some(cuid.clone());
            }
            apply_update(&mut next.profile.doc, &update)?;
            Ok(Change::Save {
                state: next,
                transactions: Vec::new(),
                events: Vec::new(),
                rendered: None,
            })
        });
        self.write(app, who.upsert_lookup(), decide, Missing::NotFound)
            .await
    }

    /// Applies an update to an existing profile only.
    pub async fn update_profile(
        &self,
        app: &App,
        who: &Identity,
        update: ProfileUpdate,
    ) -> Result<Written, ApiError> {
        let now = self.now();
        let decide: Decide = Box::new(move |loaded: &Loaded| {
            let mut next = next_version(existing(loaded, Missing::NotFound)?, now);
            apply_update(&mut next.profile.doc, &update)?;
            Ok(Change::Save {
                state: next,
                transactions: Vec::new(),
                events: Vec::new(),
                rendered: None,
            })
        });
        self.write(app, who.existing_lookup(), decide, Missing::NotFound)
            .await
    }

    pub async fn delete_profile(&self, app: &App, who: &Identity) -> Result<(), ApiError> {
        let decide: Decide = Box::new(|loaded: &Loaded| {
            let state = existing(loaded, Missing::NotFound)?;
            Ok(Change::Delete {
                profile: state.profile.clone(),
            })
        });
        match self.store_write(app, who.existing_lookup(), decide).await? {
            Outcome::Deleted => Ok(()),
            _ => Err(Missing::NotFound.error()),
        }
    }

    pub async fn set_transaction(
        &self,
        app: &App,
        who: &Identity,
        input: TransactionInput,
    ) -> Result<Written, ApiError> {
        let valid = transaction::validate(input, app, &self.rates)?;
        let now = self.now();
        // Time-ordered ids keep the id index append-only instead of touching a random page.
        let new_id = Uuid::now_v7();
        let chain = ChainRef {
            store: valid.input.store.clone(),
            store_transaction_id: valid.input.store_transaction_id.clone(),
            store_original_transaction_id: valid.input.store_original_transaction_id.clone(),
        };
        let lookup = Lookup {
            chain: Some(chain.clone()),
            ..who.existing_lookup()
        };
        let app_for_decide = app.clone();
        let decide: Decide = Box::new(move |loaded: &Loaded| {
            let before = existing(loaded, Missing::ProfileDoesNotExist)?;
            let mut next = next_version(before, now);
            let profile_id = next.profile.id;
            let seq = next.profile.version;
            let previous = loaded.related.iter().find(|t| {
                t.store == chain.store && t.store_transaction_id == chain.store_transaction_id
            });
            let i = &valid.input;
            let mut recorded = Transaction {
                id: previous.map_or(new_id, |p| p.id),
                profile_id: Some(profile_id),
                seq: previous.map_or(seq, |p| p.seq),
                purchase_type: i.purchase_type,
                store: i.store.clone(),
                environment: i.environment,
                store_product_id: i.store_product_id.clone(),
                store_base_plan_id: i.store_base_plan_id.clone(),
                store_transaction_id: i.store_transaction_id.clone(),
                store_original_transaction_id: i.store_original_transaction_id.clone(),
                offer: valid.offer.clone(),
                is_family_shared: i.is_family_shared,
                price: valid.price.clone(),
                purchased_at: i.purchased_at,
                originally_purchased_at: i.originally_purchased_at,
                expires_at: i.expires_at,
                refunded_at: i.refunded_at,
                cancellation_reason: i.cancellation_reason.clone(),
                variation_id: i.variation_id.clone(),
                renew_status: i.renew_status,
                renew_status_changed_at: i.renew_status_changed_at,
                billing_issue_detected_at: i.billing_issue_detected_at,
                grace_period_expires_at: i.grace_period_expires_at,
                created_at: previous.map_or(now, |p| p.created_at),
                updated_at: now,
                expiry_handled: false,
            };
            recorded.keep_expiry_handled(previous);
            let chain_before: Vec<Transaction> = loaded
                .related
                .iter()
                .filter(|t| t.same_chain(&chain.store, &chain.store_original_transaction_id))
                .cloned()
                .collect();
            // The rest of the chain follows the purchase to this profile (a restore on another
            // account, or a deleted profile's history re-attached).
            let mut changed: Vec<Transaction> = loaded
                .related
                .iter()
                .filter(|t| {
                    t.profile_id != Some(profile_id)
                        && t.same_chain(&chain.store, &chain.store_original_transaction_id)
                        && t.store_transaction_id != chain.store_transaction_id
                })
                .map(|t| Transaction {
                    profile_id: Some(profile_id),
                    ..t.clone()
                })
                .collect();
            changed.push(recorded.clone());
            // Replace in place, so the answer lists transactions as a later read will.
            for t in &changed {
                replace_or_push(&mut next.transactions, t);
            }
            let mut events = EventBuilder::new(&app_for_decide, &next, now);
            events.transaction_recorded(previous, &recorded, &chain_before);
            events.access_changes(Some(before), None);
            let events = events.finish()?;
            Ok(Change::Save {
                state: next,
                transactions: changed,
                events,
                rendered: None,
            })
        });
        self.write(app, lookup, decide, Missing::ProfileDoesNotExist)
            .await
    }

    pub async fn grant(
        &self,
        app: &App,
        who: &Identity,
        input: GrantInput,
    ) -> Result<Written, ApiError> {
        require_level(app, &input.access_level_id)?;
        let now = self.now();
        let starts_at = input.starts_at.unwrap_or(now);
        if let Some(expires_at) = input.expires_at {
            if expires_at <= starts_at {
                return Err(ApiError::invalid(
                    "expires_at",
                    "expires_at must be later than starts_at.",
                ));
            }
        }
        let grant_id = Uuid::new_v4();
        let app_for_decide = app.clone();
        let decide: Decide = Box::new(move |loaded: &Loaded| {
            let before = existing(loaded, Missing::ProfileDoesNotExist)?;
            let mut next = next_version(before, now);
            next.profile.doc.grants.push(Grant {
                id: grant_id,
                access_level_id: input.access_level_id.clone(),
                starts_at,
                expires_at: input.expires_at,
                created_at: now,
                seq: next.profile.version,
                purchase: None,
            });
            let events =
                access_events(&app_for_decide, before, &next, now, &input.access_level_id)?;
            Ok(Change::Save {
                state: next,
                transactions: Vec::new(),
                events,
                rendered: None,
            })
        });
        self.write(
            app,
            who.existing_lookup(),
            decide,
            Missing::ProfileDoesNotExist,
        )
        .await
    }

    pub async fn revoke(
        &self,
        app: &App,
        who: &Identity,
        input: RevokeInput,
    ) -> Result<Written, ApiError> {
        require_level(app, &input.access_level_id)?;
        let now = self.now();
        let app_for_decide = app.clone();
        let decide: Decide = Box::new(move |loaded: &Loaded| {
            let state = existing(loaded, Missing::ProfileDoesNotExist)?;
            let level = input.access_level_id.as_str();
            if !access::has_ever_had(&app_for_decide, state, level) {
                return Err(ApiError::with_message(
                    ErrorCode::ProfilePaidAccessLevelDoesNotExist,
                    format!(
                        "Profile `{}` has no `{level}` access level",
                        state.profile.id
                    ),
                ));
            }
            let revoke_at = input.revoke_at.unwrap_or(now);
            if let Some(requested) = input.revoke_at {
                let current = access::derive(&app_for_decide, state, now)
                    .into_iter()
                    .find(|v| v.access_level_id == level)
                    .and_then(|v| v.expires_at);
                if let Some(expires_at) = current {
                    if requested > expires_at {
                        return Err(ApiError::with_message(
                            ErrorCode::RevocationDateMoreThanExpirationDate,
                            format!(
                                "Revocation date ({}) is more than current expiration date ({})",
                                time::format_message(&requested),
                                time::format_message(&expires_at)
                            ),
                        ));
                    }
                }
            }
            let mut next = next_version(state, now);
            next.profile.doc.revokes.push(Revoke {
                access_level_id: level.to_string(),
                revoke_at,
                created_at: now,
                seq: next.profile.version,
            });
            let events = access_events(&app_for_decide, state, &next, now, level)?;
            Ok(Change::Save {
                state: next,
                transactions: Vec::new(),
                events,
                rendered: None,
            })
        });
        self.write(
            app,
            who.existing_lookup(),
            decide,
            Missing::ProfileDoesNotExist,
        )
        .await
    }

    /// v1 grant: a grant of the computed length and, when it names a store transaction, that
    /// transaction too (recorded once; posting it again updates it).
    pub async fn grant_v1(
        &self,
        app: &App,
        who: &Identity,
        input: GrantV1Input,
    ) -> Result<Written, ApiError> {
        require_level(app, &input.access_level_id)?;
        let now = self.now();
        let starts_at = input.starts_at.unwrap_or(now);
        if let GrantLength::Until(expires_at) = input.length {
            if expires_at <= starts_at {
                return Err(ApiError::invalid(
                    "expires_at",
                    "expires_at must be later than starts_at.",
                ));
            }
        }
        if let Some(purchase) = &input.purchase {
            if !app.knows_store(&purchase.store) {
                return Err(ApiError::invalid(
                    "store",
                    format!("Store `{}` is not configured for this app.", purchase.store),
                ));
            }
        }
        let chain = input.purchase.as_ref().and_then(|p| {
            let id = p.vendor_transaction_id.clone()?;
            Some(ChainRef {
                store: p.store.clone(),
                store_original_transaction_id: p
                    .vendor_original_transaction_id
                    .clone()
                    .unwrap_or_else(|| id.clone()),
                store_transaction_id: id,
            })
        });
        let lookup = Lookup {
            chain: chain.clone(),
            ..who.existing_lookup()
        };
        let (grant_id, transaction_id) = (Uuid::new_v4(), Uuid::now_v7());
        let app_for_decide = app.clone();
        let decide: Decide = Box::new(move |loaded: &Loaded| {
            let before = existing(loaded, Missing::NotFound)?;
            let level = input.access_level_id.as_str();
            let expires_at = match input.length {
                GrantLength::Lifetime => None,
                GrantLength::Until(t) => Some(t),
                GrantLength::Days(days) => {
                    let current = access::derive(&app_for_decide, before, now)
                        .into_iter()
                        .find(|v| v.access_level_id == level && v.is_active)
                        .and_then(|v| v.expires_at);
                    Some(current.unwrap_or(now).max(starts_at) + chrono::Duration::days(days))
                }
            };
            let mut next = next_version(before, now);
            let seq = next.profile.version;
            next.profile.doc.grants.push(Grant {
                id: grant_id,
                access_level_id: level.to_string(),
                starts_at,
                expires_at,
                created_at: now,
                seq,
                purchase: input.purchase.clone(),
            });
            let mut events = Vec::new();
            let mut transactions = Vec::new();
            if let (Some(chain), Some(purchase)) = (&chain, &input.purchase) {
                let previous = loaded.related.iter().find(|t| {
                    t.store == chain.store && t.store_transaction_id == chain.store_transaction_id
                });
                let price = input.price.clone().unwrap_or(Price {
                    country: String::new(),
                    currency: "USD".into(),
                    value_micros: 0,
                    usd_micros: 0,
                });
                let first_in_chain = !loaded.related.iter().any(|t| {
                    t.same_chain(&chain.store, &chain.store_original_transaction_id)
                        && t.store_transaction_id != chain.store_transaction_id
                });
                let offer_type = purchase.introductory_offer_type.clone().or_else(|| {
                    (price.value_micros == 0 && first_in_chain && expires_at.is_some())
                        .then(|| "free_trial".to_string())
                });
                let recorded = Transaction {
                    id: previous.map_or(transaction_id, |p| p.id),
                    profile_id: Some(next.profile.id),
                    seq: previous.map_or(seq, |p| p.seq),
                    purchase_type: if expires_at.is_some() {
                        PurchaseType::Subscription
                    } else {
                        PurchaseType::OneTimePurchase
                    },
                    store: chain.store.clone(),
                    environment: purchase.environment,
                    store_product_id: purchase.vendor_product_id.clone(),
                    store_base_plan_id: purchase.base_plan_id.clone(),
                    store_transaction_id: chain.store_transaction_id.clone(),
                    store_original_transaction_id: chain.store_original_transaction_id.clone(),
                    offer: offer_type.map(|offer_type| Offer {
                        category: "introductory".into(),
                        offer_type,
                        id: None,
                    }),
                    is_family_shared: false,
                    price,
                    purchased_at: starts_at,
                    originally_purchased_at: Some(starts_at),
                    expires_at,
                    refunded_at: None,
                    cancellation_reason: None,
                    variation_id: None,
                    renew_status: None,
                    renew_status_changed_at: None,
                    billing_issue_detected_at: None,
                    grace_period_expires_at: None,
                    created_at: previous.map_or(now, |p| p.created_at),
                    updated_at: now,
                    expiry_handled: false,
                };
                replace_or_push(&mut next.transactions, &recorded);
                let chain_before: Vec<Transaction> = loaded.related.clone();
                let mut builder = EventBuilder::new(&app_for_decide, &next, now);
                builder.transaction_recorded(previous, &recorded, &chain_before);
                events = builder.finish()?;
                transactions.push(recorded);
            }
            let mut builder = EventBuilder::new(&app_for_decide, &next, now);
            builder.access_changes(Some(before), Some(level));
            events.extend(builder.finish()?);
            Ok(Change::Save {
                state: next,
                transactions,
                events,
                rendered: None,
            })
        });
        self.write(app, lookup, decide, Missing::NotFound).await
    }

    /// v1 revoke: ends the level now (as a v2 revoke without a date) and, with `is_refund`,
    /// refunds the transaction behind it so its revenue no longer counts.
    pub async fn revoke_v1(
        &self,
        app: &App,
        who: &Identity,
        access_level_id: String,
        is_refund: bool,
    ) -> Result<Written, ApiError> {
        require_level(app, &access_level_id)?;
        let now = self.now();
        let app_for_decide = app.clone();
        let decide: Decide = Box::new(move |loaded: &Loaded| {
            let before = existing(loaded, Missing::NotFound)?;
            let level = access_level_id.as_str();
            if !access::has_ever_had(&app_for_decide, before, level) {
                return Err(ApiError::with_message(
                    ErrorCode::ProfilePaidAccessLevelDoesNotExist,
                    format!(
                        "Profile `{}` has no `{level}` access level",
                        before.profile.id
                    ),
                ));
            }
            let linked = if is_refund {
                linked_transaction(&app_for_decide, before, level, now)
            } else {
                None
            };
            let mut next = next_version(before, now);
            next.profile.doc.revokes.push(Revoke {
                access_level_id: level.to_string(),
                revoke_at: now,
                created_at: now,
                seq: next.profile.version,
            });
            let mut transactions = Vec::new();
            let mut events = Vec::new();
            if let Some(previous) = linked {
                let refunded = Transaction {
                    refunded_at: Some(
                        now.max(previous.purchased_at + chrono::Duration::microseconds(1)),
                    ),
                    cancellation_reason: Some("refund".into()),
                    renew_status: previous.renew_status.map(|_| false),
                    updated_at: now,
                    ..previous.clone()
                };
                replace_or_push(&mut next.transactions, &refunded);
                let mut builder = EventBuilder::new(&app_for_decide, &next, now);
                builder.transaction_recorded(Some(&previous), &refunded, &[]);
                events = builder.finish()?;
                transactions.push(refunded);
            }
            let mut builder = EventBuilder::new(&app_for_decide, &next, now);
            builder.access_changes(Some(before), Some(level));
            events.extend(builder.finish()?);
            Ok(Change::Save {
                state: next,
                transactions,
                events,
                rendered: None,
            })
        });
        self.write(app, who.existing_lookup(), decide, Missing::NotFound)
            .await
    }

    /// Records a store's purchase history (e.g. a Stripe subscription's paid invoices) for the
    /// user `customer_user_id`, creating the profile if needed, in one write: all of it or
    /// nothing. A purchase already recorded is updated, never counted twice.
    pub async fn import_purchases(
        &self,
        app: &App,
        customer_user_id: &str,
        chain: ChainRef,
        purchases: Vec<Transaction>,
    ) -> Result<Written, ApiError> {
        let now = self.now();
        let app_id = app.id();
        let new_profile_id = Uuid::now_v7();
        let cuid = customer_user_id.to_string();
        let lookup = Lookup {
            profile_id: None,
            customer_user_id: Some(cuid.clone()),
            chain: Some(chain),
        };
        let app_for_decide = app.clone();
        let decide: Decide = Box::new(move |loaded: &Loaded| {
            let before = loaded.profile.clone();
            let mut next = match &loaded.profile {
                Some(state) => next_version(state, now),
                None => new_profile(new_profile_id, app_id, Some(cuid.clone()), now),
            };
            let profile_id = next.profile.id;
            let seq = next.profile.version;
            let mut chain_so_far = loaded.related.clone();
            let mut changed = Vec::new();
            let mut events = Vec::new();
            for purchase in &purchases {
                let previous = chain_so_far
                    .iter()
                    .find(|t| {
                        t.store == purchase.store
                            && t.store_transaction_id == purchase.store_transaction_id
                    })
                    .cloned();
                let mut recorded = Transaction {
                    id: previous.as_ref().map_or(purchase.id, |p| p.id),
                    profile_id: Some(profile_id),
                    seq: previous.as_ref().map_or(seq, |p| p.seq),
                    created_at: previous.as_ref().map_or(now, |p| p.created_at),
                    updated_at: now,
                    ..purchase.clone()
                };
                recorded.keep_expiry_handled(previous.as_ref());
                if let Some(p) = &previous {
                    let unchanged = Transaction {
                        updated_at: p.updated_at,
                        ..recorded.clone()
                    };
                    if unchanged == *p {
                        continue;
                    }
                }
                replace_or_push(&mut next.transactions, &recorded);
                // Events see the profile with this purchase in it, and the chain before it.
                let mut builder = EventBuilder::new(&app_for_decide, &next, now);
                builder.transaction_recorded(previous.as_ref(), &recorded, &chain_so_far);
                events.extend(builder.finish()?);
                replace_or_push(&mut chain_so_far, &recorded);
                changed.push(recorded);
            }
            if changed.is_empty() && before.is_some() {
                return Ok(Change::Keep);
            }
            let mut builder = EventBuilder::new(&app_for_decide, &next, now);
            builder.access_changes(before.as_deref(), None);
            events.extend(builder.finish()?);
            Ok(Change::Save {
                state: next,
                transactions: changed,
                events,
                rendered: None,
            })
        });
        let outcome = self.store_write(app, lookup, decide).await?;
        saved(outcome, Missing::NotFound)
    }

    /// Deals with a subscription period that has ended: marks it handled and, when it was the
    /// last period of its chain, fires `subscription_expired` (or `trial_expired`) and the
    /// `access_level_updated` of the level it gave, if that level has now run out.
    pub async fn handle_expiry(&self, app: &App, due: DueExpiry) -> Result<(), ApiError> {
        let now = self.now();
        let app_for_decide = app.clone();
        let chain = due.chain.clone();
        let lookup = Lookup {
            profile_id: Some(due.profile_id),
            customer_user_id: None,
            chain: Some(due.chain),
        };
        let decide: Decide = Box::new(move |loaded: &Loaded| {
            let Some(before) = &loaded.profile else {
                return Ok(Change::Keep);
            };
            let in_chain =
                |t: &&Transaction| t.same_chain(&chain.store, &chain.store_original_transaction_id);
            let ended: Vec<&Transaction> = before
                .transactions
                .iter()
                .map(|t| &**t)
                .filter(in_chain)
                .filter(|t| t.expiry_due_at().is_some_and(|due| due <= now))
                .collect();
            if ended.is_empty() {
                return Ok(Change::Keep);
            }
            let last = before
                .transactions
                .iter()
                .map(|t| &**t)
                .filter(in_chain)
                .max_by_key(|t| (t.purchased_at, t.expires_at));
            let mut next = next_version(before, now);
            let mut handled = Vec::new();
            for t in &mut next.transactions {
                if ended
                    .iter()
                    .any(|e| e.store_transaction_id == t.store_transaction_id && e.store == t.store)
                {
                    Arc::make_mut(t).expiry_handled = true;
                    handled.push(Transaction::clone(t));
                }
            }
            let mut events = EventBuilder::new(&app_for_decide, &next, now);
            if let Some(last) = last.filter(|l| ended.iter().any(|e| std::ptr::eq(*e, *l))) {
                events.expired(last);
                if let Some(level) = access::level_of(&app_for_decide, last) {
                    events.access_ended(level);
                }
            }
            let events = events.finish()?;
            Ok(Change::Save {
                state: next,
                transactions: handled,
                events,
                rendered: None,
            })
        });
        self.store_write(app, lookup, decide).await?;
        Ok(())
    }
}

/// Replaces the transaction with the same store id, in place, or appends it (in a profile's
/// shared list or a plain one).
fn replace_or_push<T>(transactions: &mut Vec<T>, t: &Transaction)
where
    T: Borrow<Transaction> + From<Transaction>,
{
    let same = |old: &&mut T| {
        let old: &Transaction = (**old).borrow();
        old.store == t.store && old.store_transaction_id == t.store_transaction_id
    };
    match transactions.iter_mut().find(same) {
        Some(old) => *old = T::from(t.clone()),
        None => transactions.push(T::from(t.clone())),
    }
}

/// The transaction behind a level now: its source, or the purchase a v1 grant named.
fn linked_transaction(
    app: &App,
    state: &ProfileState,
    level: &str,
    now: DateTime<Utc>,
) -> Option<Transaction> {
    let view = access::derive(app, state, now)
        .into_iter()
        .find(|v| v.access_level_id == level)?;
    match view.source {
        access::Source::Transaction(t) => Some(t.clone()),
        access::Source::Grant(g) => {
            let purchase = g.purchase.as_ref()?;
            let id = purchase.vendor_transaction_id.as_deref()?;
            state
                .transactions
                .iter()
                .find(|t| t.store == purchase.store && t.store_transaction_id == id)
                .map(|t| Transaction::clone(t))
        }
    }
}

/// Grants and revokes fire `access_level_updated` for their level, and for nothing else.
fn access_events(
    app: &App,
    before: &ProfileState,
    after: &ProfileState,
    now: DateTime<Utc>,
    level: &str,
) -> Result<Vec<NewEvent>, ApiError> {
    let mut events = EventBuilder::new(app, after, now);
    events.access_changes(Some(before), Some(level));
    events.finish()
}

fn require_level(app: &App, level: &str) -> Result<(), ApiError> {
    if app.has_access_level(level) {
        Ok(())
    } else {
        Err(ApiError::with_message(
            ErrorCode::PaidAccessLevelDoesNotExist,
            format!("Paid access level `{level}` does not exist"),
        ))
    }
}

fn apply_update(doc: &mut ProfileDoc, update: &ProfileUpdate) -> Result<(), ApiError> {
    update.fields.apply(&mut doc.fields);
    if let Some(changes) = &update.attributes {
        doc.attributes = attributes::apply(&doc.attributes, changes, "custom_attributes")?;
    }
    if let Some(meta) = &update.installation_meta {
        doc.installation_meta = Some(meta.clone());
    }
    if let Some(platform) = &update.platform {
        doc.platform = Some(platform.clone());
    }
    Ok(())
}
