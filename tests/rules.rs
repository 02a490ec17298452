//! Black-box tests of the marketplace rules (filters, caps and budgets, schedules, dedupe,
//! pending re-auction and webhooks, buyer reply mapping, circuit breakers) through the
//! supplier API, against the real app and buyers on real sockets on 127.0.0.1.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::Actor;
use actix_web::{HttpRequest, HttpResponse, web};
use common::*;
use hmac::{Hmac, Mac};
use jiff::civil::date;
use jiff::tz::TimeZone;
use leadex::actors::{
    BuyerActor, BuyerHealth, BuyerSettings, CampaignActor, CampaignBuyer, CampaignServices,
    CampaignSettings,
};
use leadex::buyers::ReplyMapping;
use leadex::clock::Clock;
use leadex::coord::{Coordinator, MemoryCoordinator};
use leadex::domain::campaign::{BuyerRules, PendingPolicy};
use leadex::domain::{AuctionRules, FieldMap, Price};
use leadex::sim::{Behaviour, BidSpec, BuyerSim};
use leadex::storage::embedded::EmbeddedStore;
use leadex::storage::{IdempotentAnswer, LeadRecord, LeadStatus, LeadStore, StorageError};
use leadex::webhooks::{Outgoing, WebhookSender, body as webhook_body, event_of, fold_outbox};
use serde_json::{Value, json};
use sha2::Sha256;

fn ids(v: &Value) -> Vec<String> {
    v["buyer_ids"]
        .as_array()
        .map(|ids| ids.iter().map(|b| b.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

/// Unix ms of a local time in an IANA zone.
fn local_ms(tz: &str, y: i16, mo: i8, d: i8, h: i8, mi: i8) -> i64 {
    date(y, mo, d)
        .at(h, mi, 0, 0)
        .to_zoned_datetime(TimeZone::get(tz).unwrap())
        .unwrap()
        .timestamp()
        .as_millisecond()
}

/// A lead with its own phone and email, so dedupe tests do not collide.
fn lead_n(n: u32) -> Value {
    let mut lead = lead();
    lead["phone"] = json!(format!("555-{:03}-{:04}", 200 + n / 10_000, n % 10_000));
    lead["email"] = json!(format!("person{n}@example.com"));
    lead
}

fn bidding(bid: &str) -> Behaviour {
    Behaviour {
        bid: BidSpec::parse(bid).unwrap(),
        ..Behaviour::default()
    }
}

/// Polls GET /api/leads/{id} until its status is `want` or `within` passes.
async fn wait_for_status(app: &TestApp, lead_id: &str, want: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let (status, body) = app.get_lead(KEY, lead_id).await;
        assert_eq!(status, 200, "{body}");
        if body["status"] == want || Instant::now() > deadline {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Longer ping and post deadlines, so 200 concurrent leads on a busy machine still get
/// their bids in: these tests are about counting, not speed.
fn roomy_deadlines(text: String) -> String {
    text.replacen("ping_timeout_ms = 300", "ping_timeout_ms = 3000", 1)
        .replacen("post_timeout_ms = 1000", "post_timeout_ms = 5000", 1)
}

#[actix_web::test]
async fn each_filter_kind_decides_who_is_pinged() {
    // The lead: TX, zip 75001, homeowner yes, creditScore 700.
    let pairs = [
        ("f-state", "states = [\"TX\", \"CA\"]", "states = [\"CA\"]"),
        (
            "f-zip",
            "zip_prefixes = [\"750\"]",
            "zip_prefixes = [\"90\", \"7501\"]",
        ),
        (
            "f-eq",
            "filters = [{ field = \"homeowner\", equals = \"YES\" }]",
            "filters = [{ field = \"homeowner\", equals = \"no\" }]",
        ),
        (
            "f-in",
            "filters = [{ field = \"homeowner\", in = [\"own\", \"yes\"] }]",
            "filters = [{ field = \"homeowner\", in = [\"rent\"] }]",
        ),
        (
            "f-notin",
            "filters = [{ field = \"homeowner\", not_in = [\"rent\"] }]",
            "filters = [{ field = \"homeowner\", not_in = [\"yes\"] }]",
        ),
        (
            "f-min",
            "filters = [{ field = \"creditScore\", min = 600 }]",
            "filters = [{ field = \"creditScore\", min = 750 }]",
        ),
        (
            "f-max",
            "filters = [{ field = \"creditScore\", max = 700 }]",
            "filters = [{ field = \"creditScore\", max = 650.5 }]",
        ),
        (
            "f-exists",
            "filters = [{ field = \"homeowner\", exists = true }, { field = \"bankruptcy\", exists = false }]",
            "filters = [{ field = \"bankruptcy\", exists = true }]",
        ),
    ];
    let mut buyers = String::new();
    let mut sims: Vec<(String, BuyerSim, bool)> = Vec::new();
    for (name, admits, refuses) in pairs {
        for (suffix, rule, admitted) in [("ok", admits, true), ("no", refuses, false)] {
            let id = format!("{name}-{suffix}");
            let s = sim("10", 0);
            buyers += &ping_buyer(&id, &s, rule);
            sims.push((id, s, admitted));
        }
    }
    // A direct-post buyer with the best price, filtered out: it must get no post.
    let direct = sim("none", 0);
    buyers += &direct_buyer("f-direct-no", &direct, "99", "states = [\"NY\"]");
    let app = TestApp::spawn(&config(&data_dir(), "", &buyers)).await;

    let mut lead = lead();
    lead["homeowner"] = json!("yes");
    lead["creditScore"] = json!("700");
    let (status, body) = app.post_lead(&lead).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("sold")),
        "{body}"
    );
    for (id, s, admitted) in &sims {
        assert_eq!(s.stats.pings(), u64::from(*admitted), "buyer {id}");
    }
    assert_eq!(
        direct.stats.posts(),
        0,
        "a filtered direct-post buyer gets no post"
    );
    assert!(ids(&body)[0].ends_with("-ok"), "{body}");

    let page = app.metrics().await;
    assert_eq!(
        metric(
            &page,
            "leadex_buyer_skipped_total{buyer=\"f-min-no\",reason=\"filtered\"}"
        ),
        Some(1.0),
    );
    assert_eq!(
        metric(
            &page,
            "leadex_buyer_skipped_total{buyer=\"f-min-ok\",reason=\"filtered\"}"
        ),
        Some(0.0),
        "every series exported from start-up"
    );
    app.stop().await;
}

#[actix_web::test]
async fn a_daily_cap_of_10_holds_exactly_under_200_concurrent_leads() {
    let (capped, other) = (sim("30", 2), sim("10", 2));
    let buyers =
        ping_buyer("cap10", &capped, "daily_cap = 10") + &ping_buyer("cap10-other", &other, "");
    let app = TestApp::spawn(&roomy_deadlines(config(&data_dir(), "", &buyers))).await;

    let body = lead();
    let answers = futures::future::join_all((0..200).map(|_| app.post_lead(&body))).await;
    let mut to_capped = 0;
    for (status, answer) in &answers {
        assert_eq!(
            (*status, answer["status"].as_str()),
            (200, Some("sold")),
            "{answer}"
        );
        match ids(answer).as_slice() {
            [b] if b == "cap10" => to_capped += 1,
            [b] if b == "cap10-other" => {}
            other => panic!("unexpected buyers {other:?}"),
        }
    }
    assert_eq!(to_capped, 10, "exactly the cap, never 11");
    assert_eq!(capped.stats.posts(), 10, "no post beyond the cap");
    assert_eq!(other.stats.accepted(), 190);

    // Now full: not even pinged.
    let pings = capped.stats.pings();
    let (_, answer) = app.post_lead(&body).await;
    assert_eq!(ids(&answer), vec!["cap10-other"]);
    assert_eq!(capped.stats.pings(), pings, "a capped buyer is not pinged");
    app.stop().await;
}

#[actix_web::test]
async fn a_daily_budget_holds_exactly_in_money_under_concurrency() {
    let (spender, other) = (sim("30", 2), sim("10", 2));
    let buyers = ping_buyer("budget100", &spender, "daily_budget = 100")
        + &ping_buyer("budget-other", &other, "");
    let app = TestApp::spawn(&roomy_deadlines(config(&data_dir(), "", &buyers))).await;
    let body = lead();
    let answers = futures::future::join_all((0..200).map(|_| app.post_lead(&body))).await;
    let spent: f64 = answers
        .iter()
        .filter(|(_, a)| ids(a) == vec!["budget100"])
        .map(|(_, a)| a["price"].as_f64().unwrap())
        .sum();
    assert_eq!(
        spent, 90.0,
        "three leads of 30 fit in 100, a fourth would not"
    );
    assert_eq!(spender.stats.posts(), 3);
    assert!(
        answers
            .iter()
            .all(|(s, a)| *s == 200 && a["status"] == "sold")
    );
    app.stop().await;
}

#[actix_web::test]
async fn a_refused_post_gives_its_cap_slot_back_and_caps_survive_a_restart() {
    let refusing = sim_with(Behaviour {
        reject_rate: 1.0,
        ..bidding("30")
    });
    let other = sim("10", 0);
    let data = data_dir();
    let buyers =
        ping_buyer("slot", &refusing, "daily_cap = 2") + &ping_buyer("slot-other", &other, "");
    let text = config(&data, "", &buyers);
    let clock = Clock::manual(local_ms("UTC", 2026, 11, 25, 12, 0));
    let app = TestApp::spawn_with_clock(&text, clock.clone()).await;
    for n in 0..3 {
        let (_, answer) = app.post_lead(&lead_n(n)).await;
        assert_eq!(ids(&answer), vec!["slot-other"], "refused, so the next bid");
    }
    assert_eq!(refusing.stats.posts(), 3, "each refusal released its slot");

    refusing.set_behaviour(bidding("30"));
    for n in 3..5 {
        let (_, answer) = app.post_lead(&lead_n(n)).await;
        assert_eq!(ids(&answer), vec!["slot"]);
    }
    app.stop().await;

    // Same day after a restart: the two sales are still counted.
    let app = TestApp::spawn_with_clock(&text, clock.clone()).await;
    let pings = refusing.stats.pings();
    let (_, answer) = app.post_lead(&lead_n(5)).await;
    assert_eq!(ids(&answer), vec!["slot-other"]);
    assert_eq!(
        refusing.stats.pings(),
        pings,
        "still capped after the restart"
    );
    app.stop().await;
}

#[actix_web::test]
async fn caps_reset_at_the_buyers_local_midnight_and_top_of_the_hour() {
    let (ny, hourly, other) = (sim("30", 0), sim("20", 0), sim("10", 0));
    let buyers = ping_buyer(
        "ny-daily",
        &ny,
        "daily_cap = 2\ntimezone = \"America/New_York\"",
    ) + &ping_buyer(
        "hourly",
        &hourly,
        "hourly_cap = 1\ntimezone = \"Asia/Kolkata\"",
    ) + &ping_buyer("reset-other", &other, "");
    // 18:50 in New York, 05:20 in Kolkata.
    let clock = Clock::manual(local_ms("UTC", 2026, 11, 25, 23, 50));
    let app = TestApp::spawn_with_clock(
        &config(&data_dir(), "max_buyers = 2", &buyers),
        clock.clone(),
    )
    .await;

    let sold_to = ids;
    let (_, a) = app.post_lead(&lead()).await;
    assert_eq!(sold_to(&a), vec!["ny-daily", "hourly"]);
    let (_, a) = app.post_lead(&lead()).await;
    assert_eq!(
        sold_to(&a),
        vec!["ny-daily", "reset-other"],
        "hourly cap reached"
    );
    let (_, a) = app.post_lead(&lead()).await;
    assert_eq!(sold_to(&a), vec!["reset-other"], "daily cap reached too");

    // 00:10 UTC: a new UTC day, but still Nov 25 in New York; 05:40 in Kolkata, same hour.
    clock.set_ms(local_ms("UTC", 2026, 11, 26, 0, 10));
    let (_, a) = app.post_lead(&lead()).await;
    assert_eq!(
        sold_to(&a),
        vec!["reset-other"],
        "UTC midnight resets nothing"
    );

    // 06:00 in Kolkata: a new local hour.
    clock.set_ms(local_ms("Asia/Kolkata", 2026, 11, 26, 6, 0));
    let (_, a) = app.post_lead(&lead()).await;
    assert_eq!(sold_to(&a), vec!["hourly", "reset-other"]);

    // 00:00 in New York: a new local day.
    clock.set_ms(local_ms("America/New_York", 2026, 11, 26, 0, 0));
    let (_, a) = app.post_lead(&lead()).await;
    assert_eq!(sold_to(&a), vec!["ny-daily", "hourly"]);
    app.stop().await;
}

#[actix_web::test]
async fn a_buyer_is_pinged_only_inside_its_schedule() {
    let (scheduled, other) = (sim("30", 0), sim("10", 0));
    let buyers = ping_buyer(
        "sched",
        &scheduled,
        "timezone = \"America/Chicago\"\nschedule = [\"mon-fri 08:00-20:00\", \"sat 10:00-14:00\"]",
    ) + &ping_buyer("sched-other", &other, "");
    // Monday 2026-11-23, 10:00 in Chicago (16:00 UTC).
    let clock = Clock::manual(local_ms("America/Chicago", 2026, 11, 23, 10, 0));
    let app = TestApp::spawn_with_clock(&config(&data_dir(), "", &buyers), clock.clone()).await;
    let cases = [
        ((2026, 11, 23, 10, 0), "sched"),
        ((2026, 11, 23, 19, 59), "sched"),
        ((2026, 11, 23, 20, 0), "sched-other"),
        ((2026, 11, 24, 7, 59), "sched-other"),
        ((2026, 11, 28, 13, 30), "sched"),
        ((2026, 11, 28, 14, 0), "sched-other"),
        ((2026, 11, 29, 12, 0), "sched-other"),
    ];
    let mut expected_pings = 0;
    for ((y, mo, d, h, mi), winner) in cases {
        clock.set_ms(local_ms("America/Chicago", y, mo, d, h, mi));
        let (_, answer) = app.post_lead(&lead()).await;
        assert_eq!(ids(&answer), vec![winner], "at {y}-{mo}-{d} {h}:{mi}");
        if winner == "sched" {
            expected_pings += 1;
        }
        assert_eq!(
            scheduled.stats.pings(),
            expected_pings,
            "not pinged outside"
        );
    }
    app.stop().await;
}

#[actix_web::test]
async fn dedupe_refuses_repeats_sequential_and_simultaneous_and_survives_a_restart() {
    let buyer = sim("10", 0);
    let data = data_dir();
    let text = config(
        &data,
        "dedupe_days = 30",
        &ping_buyer("dedupe-buyer", &buyer, ""),
    );
    let clock = Clock::manual(local_ms("UTC", 2026, 11, 25, 12, 0));
    let app = TestApp::spawn_with_clock(&text, clock.clone()).await;

    let first = lead_n(1);
    let (status, body) = app.post_lead(&first).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("sold")),
        "{body}"
    );
    let (status, body) = app.post_lead(&first).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"], "Duplicate lead");
    assert_eq!(body["success"], false);

    let mut same_phone = lead_n(2);
    same_phone["phone"] = json!("+1 (555) 200-0001"); // lead_n(1)'s phone, written differently
    assert_eq!(
        app.post_lead(&same_phone).await.0,
        409,
        "normalised phone matches"
    );
    let mut same_email = lead_n(3);
    same_email["email"] = json!(" PERSON1@Example.com ");
    assert_eq!(
        app.post_lead(&same_email).await.0,
        409,
        "normalised email matches"
    );
    let mut no_email = lead_n(4);
    no_email.as_object_mut().unwrap().remove("email");
    assert_eq!(
        app.post_lead(&no_email).await.0,
        200,
        "phone alone when no email"
    );
    assert_eq!(app.post_lead(&no_email).await.0, 409);

    // Field errors come before the duplicate check.
    let mut broken = first.clone();
    broken.as_object_mut().unwrap().remove("lastName");
    assert_eq!(app.post_lead(&broken).await.0, 400);

    // An Idempotency-Key replay is answered again, never refused as a duplicate.
    let keyed = lead_n(5);
    let send = || {
        app.client
            .post(app.url("/api/leads"))
            .bearer_auth(KEY)
            .header("Idempotency-Key", "dedupe-key-1")
            .json(&keyed)
            .send()
    };
    let one: Value = send().await.unwrap().json().await.unwrap();
    let again = send().await.unwrap();
    assert_eq!(again.status().as_u16(), 200);
    let again: Value = again.json().await.unwrap();
    assert_eq!(one["lead_id"], again["lead_id"]);

    // Twenty identical leads at the same moment: exactly one proceeds.
    let twin = lead_n(6);
    let answers = futures::future::join_all((0..20).map(|_| app.post_lead(&twin))).await;
    let statuses: Vec<u16> = answers.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 409).count(),
        19,
        "{statuses:?}"
    );
    app.stop().await;

    // The claims are durable, and end with the window.
    let app = TestApp::spawn_with_clock(&text, clock.clone()).await;
    assert_eq!(
        app.post_lead(&first).await.0,
        409,
        "still a duplicate after a restart"
    );
    clock.advance_ms(30 * 86_400_000 + 1);
    assert_eq!(
        app.post_lead(&first).await.0,
        200,
        "accepted again after 30 days"
    );
    let pings_before = buyer.stats.pings();
    assert_eq!(app.post_lead(&first).await.0, 409);
    assert_eq!(
        buyer.stats.pings(),
        pings_before,
        "a duplicate reaches no buyer"
    );
    let page = app.metrics().await;
    assert!(
        metric(
            &page,
            "leadex_duplicate_leads_total{campaign=\"acme-auto\"}"
        )
        .unwrap()
            >= 25.0
    );
    app.stop().await;
}

/// One webhook call as received: the signature header and the raw body.
type Call = (Option<String>, Vec<u8>);

/// A webhook receiver on 127.0.0.1:0 that answers 500 to the first `fail_first` calls.
struct Receiver {
    url: String,
    calls: Arc<Mutex<Vec<Call>>>,
}

fn receiver(fail_first: usize) -> Receiver {
    receiver_redirecting(fail_first, None)
}

/// As `receiver`, its first `fail_first` calls answered with a `307` to `redirect_to` when
/// given.
fn receiver_redirecting(fail_first: usize, redirect_to: Option<String>) -> Receiver {
    receiver_answering(move |call| {
        if call > fail_first {
            return HttpResponse::Ok().finish();
        }
        match &redirect_to {
            Some(to) => HttpResponse::TemporaryRedirect()
                .insert_header(("location", to.clone()))
                .finish(),
            None => HttpResponse::InternalServerError().finish(),
        }
    })
}

/// A webhook endpoint that records every call (signature and body) and answers the n-th
/// (1-based) with `answer(n)`.
fn receiver_answering(
    answer: impl Fn(usize) -> HttpResponse + Clone + Send + Sync + 'static,
) -> Receiver {
    let calls: Arc<Mutex<Vec<Call>>> = Arc::default();
    let seen = calls.clone();
    let addr = serve_loopback!(move || {
        let (seen, answer) = (seen.clone(), answer.clone());
        actix_web::App::new().default_service(web::to(move |req: HttpRequest, body: web::Bytes| {
            let (seen, answer) = (seen.clone(), answer.clone());
            async move {
                let signature = req
                    .headers()
                    .get("x-leadex-signature")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let call = {
                    let mut calls = seen.lock().unwrap();
                    calls.push((signature, body.to_vec()));
                    calls.len()
                };
                answer(call)
            }
        }))
    });
    Receiver {
        url: format!("http://{addr}/hooks/leadex"),
        calls,
    }
}

const WEBHOOK_SECRET: &str = "whsec-test-7f3a";

fn with_webhook(text: String, url: &str) -> String {
    text.replacen(
        "id = \"sup-1\"\n",
        &format!(
            "id = \"sup-1\"\nwebhook_url = \"{url}\"\nwebhook_secret = \"{WEBHOOK_SECRET}\"\n"
        ),
        1,
    )
}

/// Checks the signature as a supplier would: HMAC-SHA256 of the raw body with the secret.
fn verify(signature: &Option<String>, body: &[u8]) -> Value {
    let mut mac = Hmac::<Sha256>::new_from_slice(WEBHOOK_SECRET.as_bytes()).unwrap();
    mac.update(body);
    let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    assert_eq!(signature.as_deref(), Some(expected.as_str()), "signature");
    serde_json::from_slice(body).unwrap()
}

/// Waits (up to 10 s) until the node's outbox holds no notification still to deliver.
async fn wait_for_no_webhook_waiting(app: &TestApp) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = app.metrics().await;
        if metrics.contains("leadex_webhooks_waiting 0") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{}",
            metrics
                .lines()
                .filter(|l| l.contains("webhooks"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_for_calls(receiver: &Receiver, count: usize, within: Duration) {
    let deadline = Instant::now() + within;
    while receiver.calls.lock().unwrap().len() < count && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[actix_web::test]
async fn a_pending_lead_is_sold_on_retry_when_a_buyer_starts_bidding() {
    let buyer = sim("none", 0);
    let hook = receiver(0);
    let text = with_webhook(
        config(
            &data_dir(),
            "pending_ttl_secs = 60\nretry_interval_secs = 1",
            &ping_buyer("late-bidder", &buyer, ""),
        ),
        &hook.url,
    );
    let app = TestApp::spawn(&text).await;
    let (_, body) = app.post_lead(&lead()).await;
    assert_eq!(body["status"], "pending", "{body}");
    let lead_id = body["lead_id"].as_str().unwrap().to_owned();

    buyer.set_behaviour(bidding("15"));
    let status = wait_for_status(&app, &lead_id, "sold", Duration::from_secs(10)).await;
    assert_eq!(status["status"], "sold", "{status}");
    assert_eq!(status["price"], json!(15.0));
    assert_eq!(status["buyer_ids"], json!(["late-bidder"]));
    assert_eq!(buyer.stats.posts(), 1);
    assert_eq!(buyer.stats.post_bodies()[0]["lead_id"], lead_id.as_str());

    wait_for_calls(&hook, 1, Duration::from_secs(5)).await;
    let calls = hook.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 1);
    let event = verify(&calls[0].0, &calls[0].1);
    assert_eq!(event["event"], "lead.sold");
    assert_eq!(event["lead_id"], lead_id.as_str());
    assert_eq!(event["price"], json!(15.0));
    assert_eq!(event["buyer_ids"], json!(["late-bidder"]));

    // Sold leads leave the queue: no further auctions.
    let pings = buyer.stats.pings();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(buyer.stats.pings(), pings);
    app.stop().await;
}

/// A store in front of another, for tests that need it to misbehave in one way: as one node's
/// view of a store shared with another node, its first listing of due leads read at once but
/// answered only when the test opens `gate` (so it can go stale meanwhile); or with the update
/// of given leads failing once.
struct WrappedStore {
    inner: Arc<dyn LeadStore>,
    /// Whether the first listing waits for `gate`.
    hold: bool,
    gate: Arc<tokio::sync::Semaphore>,
    /// Leads in the first listing, once read.
    listed: Mutex<Option<usize>>,
    listings: AtomicUsize,
    reads: AtomicUsize,
    /// Lead id -> whether its failing update is applied first (as a ScyllaDB timeout after
    /// the replicas wrote it); taken by the lead's first update.
    fail: Mutex<std::collections::HashMap<String, bool>>,
}

impl WrappedStore {
    /// Its first listing held until `gate` opens.
    fn new(inner: Arc<dyn LeadStore>) -> Arc<WrappedStore> {
        WrappedStore::with(inner, true, Default::default())
    }

    /// Listings answered at once; the first update of each lead in `fail` fails, after it was
    /// applied when its value is `true`.
    fn failing_updates(
        inner: Arc<dyn LeadStore>,
        fail: std::collections::HashMap<String, bool>,
    ) -> Arc<WrappedStore> {
        WrappedStore::with(inner, false, fail)
    }

    fn with(
        inner: Arc<dyn LeadStore>,
        hold: bool,
        fail: std::collections::HashMap<String, bool>,
    ) -> Arc<WrappedStore> {
        Arc::new(WrappedStore {
            inner,
            hold,
            gate: Arc::new(tokio::sync::Semaphore::new(0)),
            listed: Mutex::new(None),
            listings: AtomicUsize::new(0),
            reads: AtomicUsize::new(0),
            fail: Mutex::new(fail),
        })
    }
}

#[async_trait::async_trait]
impl LeadStore for WrappedStore {
    async fn insert_lead(
        &self,
        record: Arc<LeadRecord>,
        idempotency: Option<(String, IdempotentAnswer)>,
    ) -> Result<(), StorageError> {
        self.inner.insert_lead(record, idempotency).await
    }
    async fn get_lead(&self, lead_id: &str) -> Result<Option<LeadRecord>, StorageError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.get_lead(lead_id).await
    }
    async fn update_lead(&self, record: LeadRecord) -> Result<(), StorageError> {
        let fail = self.fail.lock().unwrap().remove(&record.lead_id);
        match fail {
            None => self.inner.update_lead(record).await,
            Some(applied) => {
                if applied {
                    self.inner.update_lead(record).await?;
                }
                Err(StorageError::Backend("write timed out".into()))
            }
        }
    }
    async fn pending_due_after(
        &self,
        campaign_id: &str,
        due_ms: i64,
        after: Option<(i64, &str)>,
        limit: usize,
    ) -> Result<Vec<LeadRecord>, StorageError> {
        let due = self
            .inner
            .pending_due_after(campaign_id, due_ms, after, limit)
            .await;
        if self.listings.fetch_add(1, Ordering::SeqCst) == 0 && self.hold {
            *self.listed.lock().unwrap() = Some(due.as_ref().map_or(0, Vec::len));
            self.gate.acquire().await.expect("gate").forget();
        }
        due
    }
    async fn put_state(&self, key: &str, value: Vec<u8>) -> Result<(), StorageError> {
        self.inner.put_state(key, value).await
    }
    async fn get_state(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner.get_state(key).await
    }
    async fn get_idempotent(
        &self,
        supplier_id: &str,
        key: &str,
        now_ms: i64,
    ) -> Result<Option<IdempotentAnswer>, StorageError> {
        self.inner.get_idempotent(supplier_id, key, now_ms).await
    }
    async fn leads_of_supplier_day(
        &self,
        supplier_id: &str,
        day: i64,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<LeadRecord>, StorageError> {
        self.inner
            .leads_of_supplier_day(supplier_id, day, after, limit)
            .await
    }
    async fn ping(&self) -> Result<(), StorageError> {
        self.inner.ping().await
    }
    async fn close(&self) -> Result<(), StorageError> {
        self.inner.close().await
    }
}

/// The re-auction scheduler of a campaign on one node, over `store`, leasing through `coord`,
/// with `buyer` as its one buyer.
fn reauctioning_campaign(
    store: Arc<dyn LeadStore>,
    coord: Arc<MemoryCoordinator>,
    buyer: &BuyerSim,
    buyer_id: &str,
) -> actix::Addr<CampaignActor> {
    // Ticks every second; a lead auctioned and still unsold is due again a minute later.
    let pending = PendingPolicy {
        ttl_ms: 3_600_000,
        retry_interval_ms: 60_000,
    };
    reauctioning_campaign_with(
        store,
        coord,
        buyer,
        buyer_id,
        pending,
        WebhookSender::new(Default::default()),
    )
}

/// As `reauctioning_campaign`, with its pending policy and supplier webhooks.
fn reauctioning_campaign_with(
    store: Arc<dyn LeadStore>,
    coord: Arc<MemoryCoordinator>,
    buyer: &BuyerSim,
    buyer_id: &str,
    pending: PendingPolicy,
    webhooks: WebhookSender,
) -> actix::Addr<CampaignActor> {
    let health = Arc::new(BuyerHealth::new(
        buyer_id,
        5,
        Duration::from_secs(30),
        Clock::system(),
    ));
    let actor = BuyerActor::new(BuyerSettings {
        id: buyer_id.to_owned(),
        ping_url: Some(buyer.url("/ping")),
        post_url: buyer.url("/post"),
        headers: Vec::new(),
        max_in_flight: 256,
        http2: false,
        ca_certs: Vec::new(),
        in_flight: Default::default(),
        mapping: ReplyMapping::default(),
        health: health.clone(),
    })
    .expect("buyer actor");
    let settings = CampaignSettings {
        id: "acme-auto".to_owned(),
        category: "Auto Insurance".to_owned(),
        seller: "ACME1234".to_owned(),
        personal_fields: Vec::new(),
        ping_timeout: Duration::from_millis(300),
        post_timeout: Duration::from_millis(1000),
        rules: AuctionRules {
            campaign_floor: Price::ZERO,
            max_buyers: 1,
        },
        buyers: vec![CampaignBuyer {
            id: buyer_id.to_owned(),
            addr: actor.start(),
            fixed_price: None,
            floor: Price::ZERO,
            rules: Arc::new(BuyerRules::default()),
            health,
        }],
        dedupe_days: None,
        pending: Some(pending),
    };
    CampaignActor::new(
        settings,
        CampaignServices {
            store,
            coord,
            clock: Clock::system(),
            webhooks,
            drain: Default::default(),
            reauctions: true,
        },
    )
    .start()
}

/// A pending lead of `acme-auto` created two minutes before `now`, due a minute before it.
fn due_pending(lead_id: &str, now: i64) -> LeadRecord {
    LeadRecord {
        lead_id: lead_id.to_owned(),
        supplier_id: "sup-1".to_owned(),
        seller: "ACME1234".to_owned(),
        campaign_id: "acme-auto".to_owned(),
        created_at_ms: now - 120_000,
        status: LeadStatus::Pending,
        price_cents: 0,
        buyer_ids: Vec::new(),
        fields: serde_json::from_value::<FieldMap>(lead()).unwrap(),
        auction_log: Vec::new(),
        next_retry_ms: Some(now - 60_000),
    }
}

async fn wait_until(what: &str, within: Duration, done: impl Fn() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "waited {within:?} for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[actix_web::test]
async fn a_resolution_whose_failed_write_was_applied_is_notified_and_one_not_applied_is_not() {
    let buyer = sim("none", 0);
    let hook = receiver(0);
    let dir = data_dir();
    let inner: Arc<dyn LeadStore> = Arc::new(EmbeddedStore::open(&dir, 64).unwrap());
    let now = Clock::system().now_ms();
    // Two pending leads past their TTL: the first tick gives both up (unsold). The first's
    // write fails after it was applied; the second's fails without it, and the next tick
    // gives it up again, stored this time.
    let (applied, lost) = ("01KPENDING00000000000000A1", "01KPENDING00000000000000B2");
    for id in [applied, lost] {
        inner
            .insert_lead(Arc::new(due_pending(id, now)), None)
            .await
            .unwrap();
    }
    let store = WrappedStore::failing_updates(
        inner.clone(),
        [(applied.to_owned(), true), (lost.to_owned(), false)]
            .into_iter()
            .collect(),
    );
    let targets = std::collections::HashMap::from([(
        "sup-1".to_owned(),
        leadex::webhooks::WebhookTarget {
            url: hook.url.clone(),
            secret: WEBHOOK_SECRET.to_owned(),
        },
    )]);
    let webhooks = WebhookSender::with_outbox(targets, &dir.join("webhooks.jsonl"), store.clone())
        .await
        .unwrap();
    let coord = Arc::new(MemoryCoordinator::new(inner.clone()));
    let pending = PendingPolicy {
        ttl_ms: 60_000,
        retry_interval_ms: 60_000,
    };
    let _campaign = reauctioning_campaign_with(
        store.clone(),
        coord,
        &buyer,
        "never-bids",
        pending,
        webhooks,
    );

    wait_for_calls(&hook, 2, Duration::from_secs(10)).await;
    // Nothing more comes: each notified once.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let calls = hook.calls.lock().unwrap().clone();
    let mut notified: Vec<(String, String)> = calls
        .iter()
        .map(|(signature, body)| {
            let event = verify(signature, body);
            (
                event["lead_id"].as_str().unwrap().to_owned(),
                event["event"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    notified.sort();
    assert_eq!(
        notified,
        vec![
            (applied.to_owned(), "lead.unsold".to_owned()),
            (lost.to_owned(), "lead.unsold".to_owned()),
        ]
    );
    for id in [applied, lost] {
        let stored = inner.get_lead(id).await.unwrap().unwrap();
        assert_eq!(stored.status, LeadStatus::Unsold, "{id}");
    }
    assert!(
        store.fail.lock().unwrap().is_empty(),
        "both writes failed once"
    );
}

#[actix_web::test]
async fn two_nodes_sharing_a_store_auction_a_due_lead_once_though_both_listed_it() {
    let buyer = sim("none", 0);
    let dir = data_dir();
    let shared: Arc<dyn LeadStore> = Arc::new(EmbeddedStore::open(&dir, 64).unwrap());
    let now = Clock::system().now_ms();
    shared
        .insert_lead(
            Arc::new(due_pending("01KPENDING0000000000000001", now)),
            None,
        )
        .await
        .unwrap();
    // Leases are shared, as through Redis; each node has its own view of the store.
    let coord = Arc::new(MemoryCoordinator::new(shared.clone()));
    let (first, second) = (
        WrappedStore::new(shared.clone()),
        WrappedStore::new(shared.clone()),
    );
    let _a = reauctioning_campaign(first.clone(), coord.clone(), &buyer, "never-bids");
    let _b = reauctioning_campaign(second.clone(), coord.clone(), &buyer, "never-bids");

    // Both nodes list the lead as due before either auctions it.
    wait_until("both listings", Duration::from_secs(5), || {
        first.listed.lock().unwrap().is_some() && second.listed.lock().unwrap().is_some()
    })
    .await;
    assert_eq!(*first.listed.lock().unwrap(), Some(1));
    assert_eq!(*second.listed.lock().unwrap(), Some(1));

    // The first node auctions it (no bid: pending, due a minute later) and ends its tick.
    first.gate.add_permits(1);
    wait_until("the first node's auction", Duration::from_secs(5), || {
        buyer.stats.pings() == 1
    })
    .await;
    wait_until("the first node's next tick", Duration::from_secs(5), || {
        first.listings.load(Ordering::SeqCst) >= 2
    })
    .await;
    let stored = shared
        .get_lead("01KPENDING0000000000000001")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.status, LeadStatus::Pending);
    assert!(stored.next_retry_ms.unwrap() > now + 30_000, "{stored:?}");

    // The second node goes on with its stale listing: the lease is free again, but the lead
    // it reads once it holds the lease is no longer due, so its buyers are not pinged again.
    second.gate.add_permits(1);
    wait_until(
        "the second node's read of the lead",
        Duration::from_secs(5),
        || second.reads.load(Ordering::SeqCst) >= 1,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(buyer.stats.pings(), 1, "auctioned once");
    let after = shared
        .get_lead("01KPENDING0000000000000001")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(after.auction_log, stored.auction_log);
    assert_eq!(after.next_retry_ms, stored.next_retry_ms);
}

#[actix_web::test]
async fn a_backlog_of_due_leads_is_worked_through_in_one_tick() {
    // Eight batches' worth of due leads; ticks come a second apart (a minute's retry
    // interval), so a batch a tick would take eight seconds.
    let buyer = sim("12", 0);
    let store: Arc<dyn LeadStore> = Arc::new(EmbeddedStore::open(&data_dir(), 64).unwrap());
    let now = Clock::system().now_ms();
    let ids: Vec<String> = (0..512).map(|n| format!("01KBACKLOG{n:016}")).collect();
    for id in &ids {
        store
            .insert_lead(Arc::new(due_pending(id, now)), None)
            .await
            .unwrap();
    }
    let started = Instant::now();
    let _campaign = reauctioning_campaign(
        store.clone(),
        Arc::new(MemoryCoordinator::new(store.clone())),
        &buyer,
        "bids-12",
    );
    // The first tick comes after a second; it sells them all.
    let deadline = started + Duration::from_millis(4500);
    let mut sold = 0;
    while Instant::now() < deadline {
        sold = 0;
        for id in &ids {
            if store.get_lead(id).await.unwrap().unwrap().status == LeadStatus::Sold {
                sold += 1;
            }
        }
        if sold == ids.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(sold, ids.len(), "sold within {:?}", started.elapsed());
    // Each once: a lead is tried at most once a tick.
    assert_eq!(buyer.stats.pings(), 512);
    assert_eq!(buyer.stats.posts(), 512);
}

#[actix_web::test]
async fn leases_another_node_holds_on_the_earliest_due_leads_do_not_hold_up_the_rest() {
    // A node that died mid-tick leaves its leases on the 64 earliest due leads until they
    // expire (five minutes); the 36 due after them are this node's to auction meanwhile.
    let buyer = sim("12", 0);
    let store: Arc<dyn LeadStore> = Arc::new(EmbeddedStore::open(&data_dir(), 64).unwrap());
    let coord = Arc::new(MemoryCoordinator::new(store.clone()));
    let now = Clock::system().now_ms();
    let ids: Vec<String> = (0..100).map(|n| format!("01KLEASED{n:017}")).collect();
    for (n, id) in ids.iter().enumerate() {
        let mut record = due_pending(id, now);
        // Due one after the other: the leased ones are the earliest.
        record.next_retry_ms = Some(now - 60_000 + n as i64);
        store.insert_lead(Arc::new(record), None).await.unwrap();
    }
    for id in &ids[..64] {
        assert!(
            coord
                .lease(&format!("retry/{id}"), now, now + 10 * 60_000)
                .await
                .unwrap()
        );
    }
    let started = Instant::now();
    let _campaign = reauctioning_campaign(store.clone(), coord.clone(), &buyer, "bids-12");
    let deadline = started + Duration::from_millis(4500);
    let mut sold = Vec::new();
    while Instant::now() < deadline {
        sold.clear();
        for id in &ids {
            if store.get_lead(id).await.unwrap().unwrap().status == LeadStatus::Sold {
                sold.push(id.clone());
            }
        }
        if sold.len() >= 36 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(sold, ids[64..], "sold within {:?}", started.elapsed());
    assert_eq!(buyer.stats.pings(), 36);
    assert_eq!(buyer.stats.posts(), 36);
}

#[actix_web::test]
async fn a_pending_lead_turns_unsold_after_its_ttl_and_the_webhook_is_retried() {
    let buyer = sim("none", 0);
    // The first call is answered with a redirect, which is not followed: a failure, retried.
    let elsewhere = receiver(0);
    let hook = receiver_redirecting(1, Some(elsewhere.url.clone()));
    let text = with_webhook(
        config(
            &data_dir(),
            "pending_ttl_secs = 2\nretry_interval_secs = 1",
            &ping_buyer("never-bids", &buyer, ""),
        ),
        &hook.url,
    );
    let app = TestApp::spawn(&text).await;
    let started = Instant::now();
    let (_, body) = app.post_lead(&lead()).await;
    assert_eq!(body["status"], "pending");
    let lead_id = body["lead_id"].as_str().unwrap().to_owned();
    // A campaign without a TTL keeps its pending leads pending.
    let mut solar = lead();
    solar["category"] = json!("Solar");
    let (_, solar_body) = app.post_lead(&solar).await;
    assert_eq!(solar_body["status"], "pending");

    let status = wait_for_status(&app, &lead_id, "unsold", Duration::from_secs(10)).await;
    assert_eq!(status["status"], "unsold", "{status}");
    assert!(status.get("price").is_none() && status.get("buyer_ids").is_none());
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "not before the TTL"
    );
    assert!(buyer.stats.pings() >= 2, "auctioned again while pending");
    let (_, solar_status) = app
        .get_lead(KEY, solar_body["lead_id"].as_str().unwrap())
        .await;
    assert_eq!(solar_status["status"], "pending");

    // The first call is refused with a 307; the retry delivers the same signed body.
    wait_for_calls(&hook, 2, Duration::from_secs(10)).await;
    let calls = hook.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2, "one failure, one retry, then done");
    assert!(
        elsewhere.calls.lock().unwrap().is_empty(),
        "the redirect was not followed"
    );
    assert_eq!(calls[0].1, calls[1].1);
    let event = verify(&calls[1].0, &calls[1].1);
    assert_eq!(event["event"], "lead.unsold");
    assert_eq!(event["status"], "unsold");
    assert_eq!(event["lead_id"], lead_id.as_str());

    // Given up: no more auctions.
    let pings = buyer.stats.pings();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(buyer.stats.pings(), pings);
    app.stop().await;
}

#[actix_web::test]
async fn a_webhook_not_yet_delivered_at_a_stop_is_delivered_by_the_next_start() {
    let buyer = sim("none", 0);
    // Refuses every call (503) until `accepting` is set.
    let accepting = Arc::new(AtomicBool::new(false));
    let open = accepting.clone();
    let hook = receiver_answering(move |_| {
        if open.load(Ordering::SeqCst) {
            HttpResponse::Ok().finish()
        } else {
            HttpResponse::ServiceUnavailable().finish()
        }
    });
    let dir = data_dir();
    let text = with_webhook(
        config(
            &dir,
            "pending_ttl_secs = 1\nretry_interval_secs = 1",
            &ping_buyer("never-bids", &buyer, ""),
        ),
        &hook.url,
    );
    let outbox = dir.join("webhooks.jsonl");

    let app = TestApp::spawn(&text).await;
    let (_, body) = app.post_lead(&lead()).await;
    assert_eq!(body["status"], "pending", "{body}");
    let lead_id = body["lead_id"].as_str().unwrap().to_owned();
    let status = wait_for_status(&app, &lead_id, "unsold", Duration::from_secs(10)).await;
    assert_eq!(status["status"], "unsold", "{status}");
    wait_for_calls(&hook, 1, Duration::from_secs(5)).await;
    // The refused try is recorded once its answer is back, after the receiver saw the call.
    let deadline = Instant::now() + Duration::from_secs(10);
    while fold_outbox(&std::fs::read_to_string(&outbox).unwrap())
        .0
        .iter()
        .all(|entry| entry.attempts == 0)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.stop().await;
    let refused = hook.calls.lock().unwrap().len();
    assert!(refused >= 1, "tried before the stop");
    let (waiting, _) = fold_outbox(&std::fs::read_to_string(&outbox).unwrap());
    assert_eq!(waiting.len(), 1, "{waiting:?}");
    assert_eq!(waiting[0].lead_id, lead_id);
    assert_eq!(waiting[0].event, "lead.unsold");
    assert_eq!(waiting[0].attempts as usize, refused);

    // The next start delivers it, signed, with the body of the first try.
    accepting.store(true, Ordering::SeqCst);
    let app = TestApp::spawn(&text).await;
    wait_for_calls(&hook, refused + 1, Duration::from_secs(10)).await;
    let calls = hook.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), refused + 1, "delivered once after the start");
    assert_eq!(calls[refused].1, calls[0].1);
    let event = verify(&calls[refused].0, &calls[refused].1);
    assert_eq!(event["event"], "lead.unsold");
    assert_eq!(event["lead_id"], lead_id.as_str());
    // The delivery is recorded once its answer is back, after the receiver saw the call.
    wait_for_no_webhook_waiting(&app).await;
    app.stop().await;
    let (waiting, _) = fold_outbox(&std::fs::read_to_string(&outbox).unwrap());
    assert!(waiting.is_empty(), "{waiting:?}");

    // Delivered is done: a third start sends nothing.
    let app = TestApp::spawn(&text).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(hook.calls.lock().unwrap().len(), refused + 1);
    app.stop().await;
}

#[actix_web::test]
async fn a_notification_recorded_before_a_crash_is_sent_only_if_its_status_was_stored() {
    // Three pending leads; then, as a crash would leave them, each with a notification in the
    // outbox and not yet tried: one whose unsold status was stored, one whose was not, and a
    // sale whose stored lead was sold otherwise (another price and buyer, as a later
    // re-auction would have).
    let buyer = sim("none", 0);
    let hook = receiver(0);
    let dir = data_dir();
    let text = with_webhook(
        config(
            &dir,
            "pending_ttl_secs = 3600\nretry_interval_secs = 3600",
            &ping_buyer("never-bids", &buyer, ""),
        ),
        &hook.url,
    );
    let app = TestApp::spawn(&text).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (_, body) = app.post_lead(&lead()).await;
        assert_eq!(body["status"], "pending", "{body}");
        ids.push(body["lead_id"].as_str().unwrap().to_owned());
    }
    app.stop().await;

    let store = EmbeddedStore::open(&dir, 64).unwrap();
    let mut outbox = String::new();
    for (n, id) in ids.iter().enumerate() {
        let mut record = store.get_lead(id).await.unwrap().unwrap();
        record.status = LeadStatus::Unsold;
        record.next_retry_ms = None;
        if n == 2 {
            record.status = LeadStatus::Sold;
            record.price_cents = 1250;
            record.buyer_ids = vec!["b-old".to_owned()];
            let mut other = record.clone();
            other.price_cents = 2000;
            other.buyer_ids = vec!["b-new".to_owned()];
            store.update_lead(other).await.unwrap();
        }
        let now = Clock::system().now_ms();
        let entry = Outgoing {
            lead_id: id.clone(),
            event: event_of(&record).to_owned(),
            supplier_id: record.supplier_id.clone(),
            body: String::from_utf8(webhook_body(&record)).unwrap(),
            attempts: 0,
            first_at_ms: now,
            next_at_ms: now,
            done: false,
        };
        outbox.push_str(&serde_json::to_string(&entry).unwrap());
        outbox.push('\n');
        if n == 0 {
            store.update_lead(record).await.unwrap();
        }
    }
    store.close().await.unwrap();
    std::fs::write(dir.join("webhooks.jsonl"), outbox).unwrap();

    let app = TestApp::spawn(&text).await;
    wait_for_calls(&hook, 1, Duration::from_secs(10)).await;
    wait_for_no_webhook_waiting(&app).await;
    let calls = hook.calls.lock().unwrap().clone();
    assert_eq!(
        calls.len(),
        1,
        "only the notification whose status was stored"
    );
    let event = verify(&calls[0].0, &calls[0].1);
    assert_eq!(event["lead_id"], ids[0].as_str());
    assert_eq!(event["event"], "lead.unsold");
    let (_, second) = app.get_lead(KEY, &ids[1]).await;
    assert_eq!(second["status"], "pending", "{second}");
    let (_, third) = app.get_lead(KEY, &ids[2]).await;
    assert_eq!(third["status"], "sold", "{third}");
    app.stop().await;
    let (waiting, _) = fold_outbox(&std::fs::read_to_string(dir.join("webhooks.jsonl")).unwrap());
    assert!(
        waiting.is_empty(),
        "the other two are ended, not kept: {waiting:?}"
    );
}

/// A buyer with its own API: answers pings and posts with fixed JSON, records posts.
struct OddBuyer {
    base: String,
    posts: Arc<Mutex<Vec<Value>>>,
}

fn odd_buyer(ping_reply: Value, post_reply: Value) -> OddBuyer {
    let posts: Arc<Mutex<Vec<Value>>> = Arc::default();
    let seen = posts.clone();
    let addr = serve_loopback!(move || {
        let (ping_reply, post_reply, seen) = (ping_reply.clone(), post_reply.clone(), seen.clone());
        actix_web::App::new()
            .route(
                "/offer",
                web::post().to(move || {
                    let reply = ping_reply.clone();
                    async move { HttpResponse::Ok().json(reply) }
                }),
            )
            .route(
                "/deliver",
                web::post().to(move |body: web::Json<Value>| {
                    let (reply, seen) = (post_reply.clone(), seen.clone());
                    async move {
                        seen.lock().unwrap().push(body.into_inner());
                        HttpResponse::Ok().json(reply)
                    }
                }),
            )
    });
    OddBuyer {
        base: format!("http://{addr}"),
        posts,
    }
}

fn odd_buyer_toml(id: &str, buyer: &OddBuyer, mapping: &str) -> String {
    format!(
        "\n[[buyers]]\nid = \"{id}\"\ncampaigns = [\"acme-auto\"]\nping_url = \"{0}/offer\"\npost_url = \"{0}/deliver\"\n{mapping}\n",
        buyer.base
    )
}

#[actix_web::test]
async fn buyer_reply_mappings_read_odd_apis() {
    // Nested string price with a dollar sign, token elsewhere, acceptance as a word.
    let nested = odd_buyer(
        json!({"data": {"offer": {"price": "$12.50"}, "id": "tok-7"}}),
        json!({"result": "SUCCESS"}),
    );
    // Highest bid, but its post answer says failure under the mapped path.
    let refuser = odd_buyer(
        json!({"quote": {"amount": 40}}),
        json!({"outcome": {"code": 0}}),
    );
    // A number under its own path, accepted as 1; bids less than `nested`.
    let numeric = odd_buyer(json!({"price": "11"}), json!({"status": {"code": 1}}));
    // Our default protocol would read no bid here: without a mapping it is ignored.
    let unmapped = odd_buyer(
        json!({"data": {"offer": {"price": 99}}}),
        json!({"accepted": true}),
    );
    let buyers = odd_buyer_toml(
        "map-nested",
        &nested,
        "bid_path = \"data.offer.price\"\ntoken_path = \"data.id\"\naccept_path = \"result\"\naccept_value = \"success\"",
    ) + &odd_buyer_toml(
        "map-refuser",
        &refuser,
        "bid_path = \"quote.amount\"\naccept_path = \"outcome.code\"\naccept_value = 1",
    ) + &odd_buyer_toml(
        "map-numeric",
        &numeric,
        "bid_path = \"price\"\naccept_path = \"status.code\"\naccept_value = 1",
    ) + &odd_buyer_toml("map-unmapped", &unmapped, "");
    let app = TestApp::spawn(&config(&data_dir(), "", &buyers)).await;

    let (_, body) = app.post_lead(&lead()).await;
    assert_eq!(body["status"], "sold", "{body}");
    assert_eq!(ids(&body), vec!["map-nested"]);
    assert_eq!(body["price"], json!(12.5));
    assert_eq!(
        refuser.posts.lock().unwrap().len(),
        1,
        "refused under its mapping"
    );
    assert_eq!(unmapped.posts.lock().unwrap().len(), 0);
    let post = nested.posts.lock().unwrap()[0].clone();
    assert_eq!(post["token"], "tok-7", "the mapped token is echoed");
    assert_eq!(post["price"], json!(12.5));

    // Without `nested`'s bid the numeric mapping wins and its `1` means accepted; the
    // refuser is tried first again and refuses.
    let app2 = TestApp::spawn(&config(
        &data_dir(),
        "",
        &(odd_buyer_toml(
            "map-refuser",
            &refuser,
            "bid_path = \"quote.amount\"\naccept_path = \"outcome.code\"\naccept_value = 1",
        ) + &odd_buyer_toml(
            "map-numeric",
            &numeric,
            "bid_path = \"price\"\naccept_path = \"status.code\"\naccept_value = 1",
        )),
    ))
    .await;
    let (_, body) = app2.post_lead(&lead()).await;
    assert_eq!(ids(&body), vec!["map-numeric"], "{body}");
    assert_eq!(body["price"], json!(11.0));
    app2.stop().await;
    app.stop().await;
}

#[actix_web::test]
async fn a_direct_buyer_outbid_on_its_probe_may_probe_again_at_once() {
    // The direct buyer's post times out (1.5 s against post_timeout_ms 1000): one failure
    // opens its breaker.
    let direct = sim_with(Behaviour {
        post_latency_ms: (1500, 1500),
        ..Behaviour::default()
    });
    let top = sim("none", 0);
    let buyers = direct_buyer(
        "direct",
        &direct,
        "20",
        "breaker_failures = 1\nbreaker_cooldown_secs = 1",
    ) + &ping_buyer("top", &top, "");
    let app = TestApp::spawn(&config(&data_dir(), "", &buyers)).await;
    let (_, body) = app.post_lead(&lead()).await;
    assert_eq!(body["status"], "pending", "{body}");
    let state = |page: &str| metric(page, "leadex_buyer_breaker_state{buyer=\"direct\"}");
    assert_eq!(state(&app.metrics().await), Some(1.0), "open");

    // After the cooldown the direct buyer is let out on the probe, and outbid: never posted.
    direct.set_behaviour(Behaviour::default());
    top.set_behaviour(bidding("50"));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_, body) = app.post_lead(&lead()).await;
    assert_eq!(ids(&body), vec!["top"]);
    assert_eq!(direct.stats.posts(), 1);

    // Right after, the top bid's post is refused: the direct buyer probes again at once and
    // buys, where it used to wait out another cooldown and the lead stayed pending.
    top.set_behaviour(Behaviour {
        reject_rate: 1.0,
        ..bidding("50")
    });
    let (_, body) = app.post_lead(&lead()).await;
    assert_eq!(ids(&body), vec!["direct"], "{body}");
    assert_eq!(body["price"], json!(20.0));
    assert_eq!(
        state(&app.metrics().await),
        Some(0.0),
        "closed by the good probe"
    );
    app.stop().await;
}

#[actix_web::test]
async fn the_breaker_opens_cools_down_probes_and_closes() {
    // Answers after the 300 ms ping deadline: every ping is a timeout.
    let flaky = sim("50", 600);
    let steady = sim("10", 0);
    let buyers = ping_buyer(
        "flaky",
        &flaky,
        "breaker_failures = 3\nbreaker_cooldown_secs = 1",
    ) + &ping_buyer("breaker-steady", &steady, "");
    let app = TestApp::spawn(&config(&data_dir(), "", &buyers)).await;
    let state = |page: &str| metric(page, "leadex_buyer_breaker_state{buyer=\"flaky\"}");
    assert_eq!(state(&app.metrics().await), Some(0.0), "closed at start");

    for _ in 0..3 {
        let (_, body) = app.post_lead(&lead()).await;
        assert_eq!(ids(&body), vec!["breaker-steady"]);
    }
    assert_eq!(flaky.stats.pings(), 3);
    assert_eq!(
        state(&app.metrics().await),
        Some(1.0),
        "open after 3 timeouts"
    );

    // Open: the buyer is left alone, and the auction no longer waits for it.
    let started = Instant::now();
    for _ in 0..3 {
        let (_, body) = app.post_lead(&lead()).await;
        assert_eq!(ids(&body), vec!["breaker-steady"]);
    }
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(flaky.stats.pings(), 3, "not pinged while open");
    let page = app.metrics().await;
    assert_eq!(
        metric(
            &page,
            "leadex_buyer_skipped_total{buyer=\"flaky\",reason=\"breaker_open\"}"
        ),
        Some(3.0)
    );

    // After the cooldown one probe decides; the buyer is healthy again and wins.
    flaky.set_behaviour(bidding("50"));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_, body) = app.post_lead(&lead()).await;
    assert_eq!(ids(&body), vec!["flaky"], "the probe's bid counts");
    assert_eq!(flaky.stats.pings(), 4);
    assert_eq!(
        state(&app.metrics().await),
        Some(0.0),
        "closed after a good probe"
    );
    let (_, body) = app.post_lead(&lead()).await;
    assert_eq!(ids(&body), vec!["flaky"]);
    assert_eq!(flaky.stats.pings(), 5);

    // A failed probe opens it again for another cooldown.
    flaky.set_behaviour(Behaviour {
        ping_latency_ms: (600, 600),
        ..bidding("50")
    });
    for _ in 0..3 {
        app.post_lead(&lead()).await;
    }
    assert_eq!(state(&app.metrics().await), Some(1.0));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    app.post_lead(&lead()).await;
    assert_eq!(flaky.stats.pings(), 9, "one probe after the cooldown");
    assert_eq!(
        state(&app.metrics().await),
        Some(1.0),
        "the probe timed out: open again"
    );
    app.post_lead(&lead()).await;
    assert_eq!(flaky.stats.pings(), 9);
    app.stop().await;
}

#[actix_web::test]
async fn a_stop_waits_for_a_re_auction_in_flight_so_its_sale_is_stored() {
    let buyer = sim("none", 0);
    let data = data_dir();
    let text = config(
        &data,
        "pending_ttl_secs = 60\nretry_interval_secs = 1",
        &ping_buyer("slow-buyer", &buyer, ""),
    );
    let app = TestApp::spawn(&text).await;
    let (_, body) = app.post_lead(&lead()).await;
    assert_eq!(body["status"], "pending", "{body}");
    let lead_id = body["lead_id"].as_str().unwrap().to_owned();

    // The buyer starts bidding but takes a while to accept the post.
    buyer.set_behaviour(Behaviour {
        post_latency_ms: (800, 800),
        ..bidding("22")
    });
    let waited = Instant::now();
    while buyer.stats.posts() == 0 {
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "the re-auction never posted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Stop while the post is in flight: the stop waits for the re-auction to be stored.
    app.stop().await;
    assert_eq!(buyer.stats.accepted(), 1);

    let app = TestApp::spawn(&text).await;
    let (status, body) = app.get_lead(KEY, &lead_id).await;
    assert_eq!(status, 200);
    assert_eq!(
        body["status"], "sold",
        "the accepted post was stored before the store closed: {body}"
    );
    assert_eq!(body["buyer_ids"], json!(["slow-buyer"]));
    app.stop().await;
}
