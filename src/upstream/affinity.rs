//! Affinity: which endpoint of a pool a conversation belongs to, so that its turns land on the
//! replica whose KV cache holds its prefix.
//!
//! An [`AffinityKey`] is a 64-bit hash of a session (scope and id) or, for a stateless client,
//! of the conversation's stable prefix: leading system messages, tools, goal block and first
//! message. Endpoints are ranked for a key by rendezvous (highest random weight) hashing: each
//! endpoint's score is a keyed hash of its name, and the key's home is the best score. When an
//! endpoint leaves, only the keys it was home to move (each to its own second choice); when one
//! joins, it takes only the keys it now scores best for.
//!
//! Bounded load (Mirrokni, Thorup, Zadimoghaddam, "Consistent Hashing with Bounded Loads"): an
//! endpoint already holding at least `⌈load_factor × (in flight + 1) / endpoints⌉` requests is
//! passed over for the key's next choice, and the key comes back once the load falls. XXH3 is a
//! specified hash, so every gateway replica and version ranks endpoints the same way.
//!
//! This module owns the hashing and the ranking; what is available and how loaded is
//! [`super::pool`]'s.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::value::RawValue;
use xxhash_rust::xxh3::{xxh3_64_with_seed, Xxh3};

use super::Upstream;

/// Ties requests to one endpoint of a pool; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey(u64);

// Distinct first bytes keep a session key from ever equalling a prefix key by construction.
const SESSION_TAG: u8 = 1;
const PREFIX_TAG: u8 = 2;

impl AffinityKey {
    /// A session's key: its caller scope and id, so equal ids of two callers do not collide.
    pub fn session(scope: &str, id: &str) -> Self {
        let mut hasher = Xxh3::new();
        hasher.update(&[SESSION_TAG]);
        part(&mut hasher, Some(scope.as_bytes()));
        part(&mut hasher, Some(id.as_bytes()));
        Self(hasher.digest())
    }

    /// A stateless conversation's key, from what stays fixed while it grows: the leading
    /// system messages, the tools, the goal block and the first other message, each as the
    /// client sent its bytes. Every part is length-prefixed, so moving bytes from one part to
    /// the next changes the key.
    pub fn prefix(system: &[&[u8]], tools: Option<&[u8]>, goal: Option<&[u8]>, first: Option<&[u8]>) -> Self {
        let mut hasher = Xxh3::new();
        hasher.update(&[PREFIX_TAG]);
        hasher.update(&(system.len() as u64).to_le_bytes());
        for message in system {
            part(&mut hasher, Some(message));
        }
        part(&mut hasher, tools);
        part(&mut hasher, goal);
        part(&mut hasher, first);
        Self(hasher.digest())
    }

    /// The prefix key of a chat request body, when `route` has a pool with affinity; `None`
    /// otherwise (no parse at all) or when the body has no messages.
    pub fn for_stateless(route: &[Arc<Upstream>], body: &[u8]) -> Option<Self> {
        if !route.iter().any(|u| u.wants_affinity()) {
            return None;
        }
        Self::of_chat_body(body)
    }

    /// The prefix key of a chat request body: one borrowed parse of `messages` and `tools`.
    pub fn of_chat_body(body: &[u8]) -> Option<Self> {
        #[derive(Deserialize)]
        struct Fields<'a> {
            #[serde(borrow)]
            messages: Vec<&'a RawValue>,
            #[serde(borrow)]
            tools: Option<&'a RawValue>,
        }
        #[derive(Deserialize)]
        struct Role<'a> {
            #[serde(borrow)]
            role: Option<&'a str>,
        }
        let fields: Fields<'_> = serde_json::from_slice(body).ok()?;
        let is_system = |m: &&RawValue| {
            serde_json::from_str::<Role<'_>>(m.get())
                .is_ok_and(|r| matches!(r.role, Some("system" | "developer")))
        };
        let leading = fields.messages.iter().take_while(|m| is_system(m)).count();
        let system: Vec<&[u8]> = fields.messages[..leading].iter().map(|m| m.get().as_bytes()).collect();
        let first = fields.messages.get(leading).map(|m| m.get().as_bytes());
        if system.is_empty() && first.is_none() {
            return None;
        }
        Some(Self::prefix(&system, fields.tools.map(|t| t.get().as_bytes()), None, first))
    }

    /// This key's rendezvous score for the endpoint whose name hashes to `endpoint`.
    pub(super) fn score(self, endpoint: u64) -> u64 {
        xxh3_64_with_seed(&endpoint.to_le_bytes(), self.0)
    }
}

fn part(hasher: &mut Xxh3, bytes: Option<&[u8]>) {
    match bytes {
        // u64::MAX marks an absent part, distinct from an empty one.
        None => hasher.update(&u64::MAX.to_le_bytes()),
        Some(bytes) => {
            hasher.update(&(bytes.len() as u64).to_le_bytes());
            hasher.update(bytes);
        }
    }
}

/// The hash an endpoint is ranked by: of its name (`host:port`), so every gateway agrees.
pub(super) fn endpoint_hash(name: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(name.as_bytes())
}

/// The most requests an endpoint may hold before a keyed request passes it over: the bound of
/// consistent hashing with bounded loads, counting the request being placed.
pub(super) fn load_bound(in_flight: usize, endpoints: usize, load_factor: f64) -> usize {
    let average = (in_flight + 1) as f64 / endpoints.max(1) as f64;
    ((load_factor * average).ceil() as usize).max(1)
}

/// One endpoint as affinity sees it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Candidate {
    /// [`endpoint_hash`] of its name.
    pub hash: u64,
    /// Ejected, or already failed for this request.
    pub eligible: bool,
    pub in_flight: usize,
}

/// How an endpoint was chosen, for the metric and the logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    /// The key's first choice.
    Home,
    /// The home holds too many requests; a later choice under the bound.
    Spill,
    /// The home is ejected or already failed for this request.
    Moved,
    /// No key: the balancer's choice.
    Balanced,
}

impl Choice {
    pub fn label(self) -> &'static str {
        match self {
            Choice::Home => "home",
            Choice::Spill => "spill",
            Choice::Moved => "moved",
            Choice::Balanced => "balanced",
        }
    }
}

/// Places `key` on one of `candidates` (at least one eligible): the best-ranked eligible one
/// under the load bound, else (every eligible one at the bound) the best-ranked eligible one.
/// `in_flight` and the bound count eligible endpoints only.
pub(super) fn place(key: AffinityKey, candidates: &[Candidate], load_factor: f64) -> Option<(usize, Choice)> {
    let mut ranked: Vec<(u64, usize)> =
        candidates.iter().enumerate().map(|(i, c)| (key.score(c.hash), i)).collect();
    // Highest score first; the index breaks (astronomically unlikely) ties deterministically.
    ranked.sort_unstable_by(|a, b| b.cmp(a));
    let eligible = candidates.iter().filter(|c| c.eligible);
    let (count, in_flight) = eligible.fold((0, 0), |(n, sum), c| (n + 1, sum + c.in_flight));
    if count == 0 {
        return None;
    }
    let bound = load_bound(in_flight, count, load_factor);
    let home = ranked[0].1;
    let under_bound =
        ranked.iter().map(|&(_, i)| i).find(|&i| candidates[i].eligible && candidates[i].in_flight < bound);
    let first_eligible = ranked.iter().map(|&(_, i)| i).find(|&i| candidates[i].eligible)?;
    let chosen = under_bound.unwrap_or(first_eligible);
    let choice = if chosen == home {
        Choice::Home
    } else if candidates[home].eligible {
        Choice::Spill
    } else if chosen == first_eligible {
        Choice::Moved
    } else {
        // The home was out and the next one was full too.
        Choice::Spill
    };
    Some((chosen, choice))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn candidates(names: &[&str]) -> Vec<Candidate> {
        names.iter().map(|n| Candidate { hash: endpoint_hash(n), eligible: true, in_flight: 0 }).collect()
    }

    fn home(key: AffinityKey, names: &[&str]) -> String {
        let (i, _) = place(key, &candidates(names), 2.0).unwrap();
        names[i].to_string()
    }

    fn keys(n: usize) -> impl Iterator<Item = AffinityKey> {
        (0..n).map(|i| AffinityKey::session("scope", &format!("session-{i}")))
    }

    const FIVE: [&str; 5] =
        ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080", "10.0.0.4:8080", "10.0.0.5:8080"];

    #[test]
    fn keys_are_stable_and_do_not_depend_on_endpoint_order() {
        // The same inputs give the same key in every process (XXH3 is specified).
        assert_eq!(AffinityKey::session("scope", "s1"), AffinityKey::session("scope", "s1"));
        assert_ne!(AffinityKey::session("scope", "s1"), AffinityKey::session("other", "s1"));
        let mut reversed = FIVE;
        reversed.reverse();
        for key in keys(200) {
            assert_eq!(home(key, &FIVE), home(key, &reversed));
        }
    }

    #[test]
    fn keys_spread_evenly() {
        let mut per_endpoint: HashMap<String, usize> = HashMap::new();
        for key in keys(10_000) {
            *per_endpoint.entry(home(key, &FIVE)).or_default() += 1;
        }
        assert_eq!(per_endpoint.len(), 5);
        for (endpoint, n) in per_endpoint {
            assert!((1_800..=2_200).contains(&n), "{endpoint}: {n} of 10000");
        }
    }

    #[test]
    fn only_the_leaving_endpoints_keys_move_and_they_spread() {
        let before: Vec<String> = keys(10_000).map(|k| home(k, &FIVE)).collect();
        let four = [FIVE[0], FIVE[1], FIVE[3], FIVE[4]];
        let mut moved_to: HashMap<String, usize> = HashMap::new();
        for (key, was) in keys(10_000).zip(&before) {
            let now = home(key, &four);
            if was == FIVE[2] {
                *moved_to.entry(now).or_default() += 1;
            } else {
                assert_eq!(&now, was, "a key of a remaining endpoint moved");
            }
        }
        // The departed endpoint's ~2000 keys spread over the other four.
        assert_eq!(moved_to.len(), 4);
        assert!(moved_to.values().all(|&n| n > 300), "{moved_to:?}");
    }

    #[test]
    fn a_joining_endpoint_takes_only_keys_it_now_ranks_first() {
        let four = [FIVE[0], FIVE[1], FIVE[2], FIVE[3]];
        let mut taken = 0;
        for key in keys(10_000) {
            let (was, now) = (home(key, &four), home(key, &FIVE));
            if was != now {
                assert_eq!(now, FIVE[4]);
                taken += 1;
            }
        }
        assert!((1_800..=2_200).contains(&taken), "{taken}");
    }

    #[test]
    fn an_overloaded_home_spills_to_the_next_choice_and_the_key_comes_back() {
        let key = AffinityKey::session("scope", "busy");
        let mut endpoints = candidates(&FIVE);
        let (home_index, choice) = place(key, &endpoints, 1.25).unwrap();
        assert_eq!(choice, Choice::Home);
        // Home at 3, the rest idle: the bound is ⌈1.25 × 4 / 5⌉ = 1.
        endpoints[home_index].in_flight = 3;
        let (spilled, choice) = place(key, &endpoints, 1.25).unwrap();
        assert_eq!(choice, Choice::Spill);
        assert_ne!(spilled, home_index);
        // The spill goes to the key's second choice: the home of the key without its home.
        let mut without_home = endpoints.clone();
        without_home[home_index].eligible = false;
        assert_eq!(place(key, &without_home, 1.25).unwrap(), (spilled, Choice::Moved));
        // Load falls: back home.
        endpoints[home_index].in_flight = 0;
        assert_eq!(place(key, &endpoints, 1.25).unwrap(), (home_index, Choice::Home));
    }

    #[test]
    fn bounded_load_caps_every_endpoint_even_for_one_hot_key() {
        // 100 requests of one conversation placed while none finishes: without the bound all
        // would sit on one endpoint; with it no endpoint passes ⌈1.25 × 100 / 5⌉ = 25.
        let key = AffinityKey::session("scope", "hot");
        let mut endpoints = candidates(&FIVE);
        for _ in 0..100 {
            let (i, _) = place(key, &endpoints, 1.25).unwrap();
            endpoints[i].in_flight += 1;
        }
        let loads: Vec<usize> = endpoints.iter().map(|c| c.in_flight).collect();
        assert!(loads.iter().all(|&n| n <= 25), "{loads:?}");
        assert_eq!(loads.iter().sum::<usize>(), 100);
    }

    #[test]
    fn bounded_load_holds_for_many_keys_placed_at_once() {
        let mut endpoints = candidates(&FIVE);
        let mut placed = 0;
        for key in keys(1_000) {
            let (i, _) = place(key, &endpoints, 1.25).unwrap();
            endpoints[i].in_flight += 1;
            placed += 1;
            let max = endpoints.iter().map(|c| c.in_flight).max().unwrap();
            assert!(max <= load_bound(placed - 1, 5, 1.25), "{max} after {placed}");
        }
    }

    #[test]
    fn no_eligible_endpoint_places_nothing() {
        let mut endpoints = candidates(&FIVE[..2]);
        endpoints.iter_mut().for_each(|c| c.eligible = false);
        assert_eq!(place(AffinityKey::session("s", "x"), &endpoints, 2.0), None);
    }

    #[test]
    fn the_prefix_key_ignores_later_messages_and_catches_prefix_changes() {
        let body = |extra: &str, system: &str, tools: &str| {
            format!(
                r#"{{"model":"m","tools":{tools},"messages":[{{"role":"system","content":"{system}"}},{{"role":"user","content":"task"}}{extra}]}}"#
            )
        };
        let key = |b: String| AffinityKey::of_chat_body(b.as_bytes()).unwrap();
        let base = key(body("", "be terse", "[]"));
        let grown = key(body(
            r#",{"role":"assistant","content":"ok"},{"role":"user","content":"more"}"#,
            "be terse",
            "[]",
        ));
        assert_eq!(base, grown, "appending turns keeps the key");
        assert_ne!(base, key(body("", "be verbose", "[]")));
        assert_ne!(base, key(body("", "be terse", r#"[{"type":"function"}]"#)));
        // Length prefixes: the same bytes split differently are a different prefix.
        assert_ne!(
            AffinityKey::prefix(&[b"ab"], None, None, Some(b"c")),
            AffinityKey::prefix(&[b"a"], None, None, Some(b"bc"))
        );
        assert_ne!(
            AffinityKey::prefix(&[], Some(b""), None, None),
            AffinityKey::prefix(&[], None, None, None)
        );
        assert_eq!(AffinityKey::of_chat_body(br#"{"messages":[]}"#), None);
        assert_eq!(AffinityKey::of_chat_body(b"not json"), None);
    }
}
