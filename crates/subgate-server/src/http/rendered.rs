//! Profiles' answers to a read, rendered at each write and stored with the profile (ADR 0014).
//!
//! A GET profile that finds its stored answer current sends it as it is, with the request's
//! `timestamp` put in: no decoding of the profile and no rendering, which at a million profiles
//! were most of a read's cost. An answer holds while nothing it shows can change: the app's
//! definition and this build's output are what they were ([`fingerprint`]), and the instant is
//! inside the window over which the profile's access is steady
//! ([`subgate_core::access::steady_window`]). Otherwise the profile is read and rendered as
//! before.
//!
//! Stored form: a tag byte, the fingerprint, the window's two ends (microseconds, `i64::MIN` and
//! `i64::MAX` for open ends), where the timestamp's digits go in the body, the body's length,
//! then the body as an LZ4 block compressed against a fixed dictionary ([`DICTIONARY_V1`]).

use super::wire;
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use subgate_core::access;
use subgate_core::model::{App, ProfileState};
use subgate_core::service::{ProfileRenderer, Services};
use uuid::Uuid;

const FORMAT_V1: u8 = 1;
/// A profile's answer as the demo app renders it, with a subscription's access level before
/// it: the field names and usual values every answer repeats. Frozen like the SQLite rows'
/// dictionary (ADR 0010): a new one comes with a new format tag; a test pins its hash.
const DICTIONARY_V1: &[u8] = include_bytes!("rendered-profile-v1.dict");
const HEADER: usize = 1 + 8 + 8 + 8 + 4 + 4;
/// No profile's answer comes near this; a larger length means a damaged value.
const MAX_BODY: usize = 64 << 20;
const TIMESTAMP_KEY: &[u8] = b"\"timestamp\":";

/// The apps this node serves, each with the fingerprint its answers are stored under.
pub struct RenderedProfiles {
    apps: HashMap<Uuid, (Arc<App>, u64)>,
}

/// What an answer was rendered against: the app's definition (products, access levels) and
/// this build, whose output may differ from an earlier one's. A stored answer made under
/// another fingerprint is not used.
fn fingerprint(app: &App) -> u64 {
    let mut hasher = subgate_core::fnv::Fnv1a::new();
    hasher.write(&[FORMAT_V1]);
    hasher.write(env!("CARGO_PKG_VERSION").as_bytes());
    hasher.write(&serde_json::to_vec(&app.definition).unwrap_or_default());
    hasher.finish()
}

fn micros(instant: Option<DateTime<Utc>>, open: i64) -> i64 {
    instant.map_or(open, |i| i.timestamp_micros())
}

impl RenderedProfiles {
    pub fn new<'a>(apps: impl IntoIterator<Item = &'a Arc<App>>) -> Self {
        let apps = apps
            .into_iter()
            .map(|app| (app.id(), (Arc::clone(app), fingerprint(app))))
            .collect();
        Self { apps }
    }

    /// The body to answer a read of `app` at `now` with, if `stored` still holds then.
    pub fn answer(&self, app: &App, stored: &[u8], now: DateTime<Utc>) -> Option<Vec<u8>> {
        let (_, expected) = self.apps.get(&app.id())?;
        let (header, block) = stored.split_at_checked(HEADER)?;
        let word = |at: usize| -> Option<[u8; 8]> { header.get(at..at + 8)?.try_into().ok() };
        let half = |at: usize| -> Option<usize> {
            Some(u32::from_le_bytes(header.get(at..at + 4)?.try_into().ok()?) as usize)
        };
        if header[0] != FORMAT_V1 || u64::from_le_bytes(word(1)?) != *expected {
            return None;
        }
        let (from, until) = (i64::from_le_bytes(word(9)?), i64::from_le_bytes(word(17)?));
        let at = now.timestamp_micros();
        if at < from || at >= until {
            return None;
        }
        let (digits_at, length) = (half(25)?, half(29)?);
        // An LZ4 sequence writes at most about 255 bytes per byte it takes: a damaged length
        // must not make a read allocate more than its block can fill.
        if length > MAX_BODY || length > block.len().saturating_mul(256) || digits_at > length {
            return None;
        }
        let mut body = Vec::with_capacity(length + 20);
        body.resize(length, 0);
        let written =
            lz4_flex::block::decompress_into_with_dict(block, &mut body, DICTIONARY_V1).ok()?;
        // The digits go right after the key, or the header is not what was written.
        if written != length || !body[..digits_at].ends_with(TIMESTAMP_KEY) {
            return None;
        }
        let timestamp = now.timestamp_millis().to_string();
        body.splice(digits_at..digits_at, timestamp.bytes());
        Some(body)
    }
}

/// Bounds the answers stored in the background after reads (see [`Renewals::renew`]).
#[derive(Default, Clone)]
pub struct Renewals {
    in_flight: Arc<AtomicUsize>,
}

/// Renewals under way at once, at most: each is a write, and after an upgrade every profile
/// needs one, far more than the writer can take at the rate reads come.
const MAX_RENEWALS: usize = 16;

impl Renewals {
    /// Stores `state`'s answer in the background, so the next reads of the profile need not
    /// render it. Skipped when [`MAX_RENEWALS`] are under way: a later read renews it.
    pub fn renew(&self, services: &Services, state: Arc<ProfileState>) {
        if self.in_flight.fetch_add(1, Ordering::AcqRel) >= MAX_RENEWALS {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        let (services, in_flight) = (services.clone(), Arc::clone(&self.in_flight));
        tokio::spawn(async move {
            if let Err(e) = services.renew_rendered(&state).await {
                tracing::warn!(error = %e, "cannot store a profile's answer");
            }
            in_flight.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

impl ProfileRenderer for RenderedProfiles {
    fn render(&self, state: &ProfileState, now: DateTime<Utc>) -> Option<Vec<u8>> {
        let (app, fingerprint) = self.apps.get(&state.profile.app_id)?;
        let mut body = wire::profile_json(app, state, now)?;
        // The first `"timestamp":` is the profile's own key: only uuids, the customer user id
        // and numbers come before it, and a string's quotes are escaped.
        let key = body
            .windows(TIMESTAMP_KEY.len())
            .position(|w| w == TIMESTAMP_KEY)?;
        let digits_at = key + TIMESTAMP_KEY.len();
        let digits = body[digits_at..]
            .iter()
            .take_while(|b| b.is_ascii_digit() || **b == b'-')
            .count();
        body.drain(digits_at..digits_at + digits);
        let (from, until) = access::steady_window(state, now);
        let mut stored = Vec::with_capacity(HEADER + body.len() / 2);
        stored.push(FORMAT_V1);
        stored.extend_from_slice(&fingerprint.to_le_bytes());
        stored.extend_from_slice(&micros(from, i64::MIN).to_le_bytes());
        stored.extend_from_slice(&micros(until, i64::MAX).to_le_bytes());
        stored.extend_from_slice(&u32::try_from(digits_at).ok()?.to_le_bytes());
        stored.extend_from_slice(&u32::try_from(body.len()).ok()?.to_le_bytes());
        stored.extend_from_slice(&lz4_flex::block::compress_with_dict(&body, DICTIONARY_V1));
        Some(stored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::wire::tests::rich_profile;
    use chrono::Duration;

    fn instant(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    /// Wherever it was made, a stored answer is used exactly inside its window, and then says
    /// byte for byte what rendering the profile anew says.
    #[test]
    fn a_stored_answer_is_the_fresh_render_while_it_holds() {
        let (app, state) = rich_profile();
        let app = Arc::new(app);
        let renderer = RenderedProfiles::new([&app]);
        let instants = [
            "2020-01-01T00:00:00Z",
            "2026-11-01T10:00:00.123455Z",
            "2026-11-01T10:00:00.123456Z",
            "2026-11-02T12:00:00Z",
            "2026-11-03T00:00:00Z",
            "2030-06-01T00:00:00.000001Z",
            "2036-11-01T09:59:59.999999Z",
            "2036-11-01T10:00:00Z",
            "2040-01-01T00:00:00Z",
        ]
        .map(instant);
        let mut used = 0;
        for made in instants {
            let stored = renderer.render(&state, made).unwrap();
            let (from, until) = access::steady_window(&state, made);
            for now in instants
                .iter()
                .flat_map(|&i| [i, i + Duration::milliseconds(7)])
            {
                let holds = from.is_none_or(|f| f <= now) && until.is_none_or(|u| now < u);
                match renderer.answer(&app, &stored, now) {
                    Some(body) => {
                        assert!(holds, "made at {made}, used at {now}");
                        let fresh = wire::profile_json(&app, &state, now).unwrap();
                        assert_eq!(
                            String::from_utf8(body).unwrap(),
                            String::from_utf8(fresh).unwrap()
                        );
                        used += 1;
                    }
                    None => assert!(!holds, "made at {made}, not used at {now}"),
                }
            }
        }
        assert!(used >= instants.len(), "{used} answers used");
    }

    #[test]
    fn a_customer_user_id_that_looks_like_the_timestamp_changes_nothing() {
        let (app, mut state) = rich_profile();
        state.profile.customer_user_id = Some("x\",\"timestamp\":1,\"y".into());
        let app = Arc::new(app);
        let renderer = RenderedProfiles::new([&app]);
        let now = instant("2027-01-01T00:00:00.5Z");
        let stored = renderer.render(&state, now).unwrap();
        let later = now + Duration::seconds(1);
        assert_eq!(
            renderer.answer(&app, &stored, later),
            wire::profile_json(&app, &state, later)
        );
    }

    /// An answer made for another definition of the app (here, without its products) would
    /// show other access levels: it is not used.
    #[test]
    fn an_answer_made_under_another_definition_is_not_used() {
        let (app, state) = rich_profile();
        let mut changed = app.definition.clone();
        changed.products.clear();
        let (app, changed) = (Arc::new(app), Arc::new(App::new(changed)));
        let now = instant("2027-01-01T00:00:00Z");
        let stored = RenderedProfiles::new([&changed])
            .render(&state, now)
            .unwrap();
        let renderer = RenderedProfiles::new([&app]);
        assert_eq!(renderer.answer(&app, &stored, now), None);
        let own = renderer.render(&state, now).unwrap();
        assert!(renderer.answer(&app, &own, now).is_some());
        // An app this node does not serve gets no answer made.
        let mut stranger = state.clone();
        stranger.profile.app_id = Uuid::new_v4();
        assert_eq!(renderer.render(&stranger, now), None);
    }

    /// Answers on disk need these exact bytes.
    #[test]
    fn the_dictionary_stays_what_stored_answers_were_written_with() {
        let hash = subgate_core::fnv::fnv1a(DICTIONARY_V1);
        assert_eq!(
            (DICTIONARY_V1.len(), hash),
            (2695, 18_145_677_974_122_126_092)
        );
    }

    #[test]
    fn a_damaged_answer_is_not_used() {
        let (app, state) = rich_profile();
        let app = Arc::new(app);
        let renderer = RenderedProfiles::new([&app]);
        let now = instant("2027-01-01T00:00:00Z");
        let stored = renderer.render(&state, now).unwrap();
        let mut cases = vec![
            Vec::new(),
            stored[..HEADER].to_vec(),
            stored[..stored.len() - 1].to_vec(),
        ];
        // A length the block could never fill (and that must not be allocated).
        let mut huge = stored.clone();
        huge[29..33].copy_from_slice(&(60u32 << 20).to_le_bytes());
        cases.push(huge);
        for at in [0, 25, 29, HEADER + 1] {
            let mut damaged = stored.clone();
            damaged[at] ^= 0xff;
            cases.push(damaged);
        }
        for case in cases {
            let answer = renderer.answer(&app, &case, now);
            // A flipped byte inside the LZ4 block may still decode; it must not panic, and
            // a header it broke must not be trusted.
            if case.len() < stored.len() || case[..HEADER] != stored[..HEADER] {
                assert_eq!(answer, None, "{} bytes", case.len());
            }
        }
    }
}
