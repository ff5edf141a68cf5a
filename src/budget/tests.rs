//! The engine on this relay's own counts, with a clock the tests set.

use std::cell::Cell;
use std::collections::BTreeMap;

use super::*;
use crate::cost::RawPrice;

thread_local! {
    /// Each test's clock: tests run on threads of their own, and so do their runtimes.
    static NOW: Cell<i64> = const { Cell::new(0) };
}

fn clock() -> i64 {
    NOW.with(Cell::get)
}

fn at(text: &str) {
    let t: jiff::Timestamp = text.parse().unwrap();
    NOW.with(|n| n.set(t.as_millisecond()));
}

/// $1 per million input tokens, $2 per million output tokens.
fn engine(settings: BudgetSettings) -> Arc<Budgets> {
    let mut prices = BTreeMap::new();
    prices.insert(
        "m".to_string(),
        RawPrice {
            input: 1.0,
            cached_input: None,
            output: 2.0,
        },
    );
    Arc::new(Budgets::with_clock(
        None,
        Pricing::new(&prices),
        settings,
        &Registry::new(),
        clock,
    ))
}

fn spec(id: &str, usd: f64, mode: Mode, tz: &str) -> Arc<BudgetSpec> {
    Arc::new(BudgetSpec {
        id: id.into(),
        usd,
        period: Period::Day,
        time_zone: window::time_zone(tz).unwrap(),
        time_zone_name: tz.into(),
        mode,
        cut_running: true,
        model: None,
        route: None,
    })
}

fn ask<'a>(specs: &'a [Arc<BudgetSpec>], model: Option<&'a str>, max_tokens: u64) -> Ask<'a> {
    Ask {
        specs,
        tenant: "t",
        route: "r",
        model,
        max_tokens: Some(max_tokens),
        default_max_tokens: 1024,
        input_tokens: 1000,
    }
}

/// The hold of a request the budgets admit (panics if they refuse it).
async fn held(e: &Arc<Budgets>, specs: &[Arc<BudgetSpec>], model: Option<&str>, max: u64) -> Hold {
    e.admit(&ask(specs, model, max)).await.unwrap().unwrap()
}

fn run<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// 1000 input tokens ($0.001) and 1000 output tokens ($0.002): $0.003 reserved; a
/// $0.01 budget takes three such requests at once, not four.
#[test]
fn reservations_hold_the_cap_and_settlements_free_what_was_not_spent() {
    at("2026-12-02T10:00:00Z");
    let e = engine(BudgetSettings::default());
    let specs = [spec("tenant:t", 0.01, Mode::Block, "UTC")];
    run(async {
        let mut holds = Vec::new();
        for _ in 0..3 {
            let h = held(&e, &specs, Some("m"), 1000).await;
            assert!((h.reserved_usd() - 0.003).abs() < 1e-12);
            holds.push(h);
        }
        let Err(Refusal::Exceeded(room)) = e.admit(&ask(&specs, Some("m"), 1000)).await else {
            panic!("a fourth reservation fit");
        };
        assert!((room.remaining_usd - 0.001).abs() < 1e-9, "{room:?}");
        assert_eq!(room.window.end_rfc3339(), "2026-12-03T00:00:00Z");
        assert_eq!(room.retry_after(), 14 * 3600);
        // Each used a tenth of its reservation.
        for h in holds {
            let actual = h.settlement(Some(0.0003), "ok", 0);
            h.settle(actual, Some(100)).await;
        }
        let level = e.local.level("tenant:t", specs[0].window_at(clock()));
        assert_eq!((level.spent, level.reserved), (900_000, 0));
        assert!(e
            .admit(&ask(&specs, Some("m"), 1000))
            .await
            .unwrap()
            .is_some());
    });
}

#[test]
fn the_window_resets_at_midnight_of_its_time_zone() {
    let e = engine(BudgetSettings::default());
    let specs = [spec("tenant:t", 0.003, Mode::Block, "Europe/Berlin")];
    run(async {
        // 22:30 UTC is 23:30 in Berlin: the day has half an hour left.
        at("2026-12-02T22:30:00Z");
        let h = held(&e, &specs, Some("m"), 1000).await;
        let actual = h.settlement(Some(0.003), "ok", 0);
        h.settle(actual, None).await;
        assert!(matches!(
            e.admit(&ask(&specs, Some("m"), 1000)).await,
            Err(Refusal::Exceeded(r)) if r.retry_after() == 1800
        ));
        // 23:00 UTC is midnight in Berlin: a new day, though not yet in UTC.
        at("2026-12-02T23:00:00Z");
        assert!(e
            .admit(&ask(&specs, Some("m"), 1000))
            .await
            .unwrap()
            .is_some());
    });
}

#[test]
fn an_audit_budget_serves_and_counts_what_passes_its_cap() {
    at("2026-12-02T10:00:00Z");
    let e = engine(BudgetSettings::default());
    let specs = [spec("tenant:t", 0.004, Mode::Audit, "UTC")];
    run(async {
        let first = held(&e, &specs, Some("m"), 1000).await;
        assert_eq!(first.decision, "ok");
        let second = held(&e, &specs, Some("m"), 1000).await;
        assert_eq!(second.decision, "audit_over");
        assert_eq!(
            e.metrics
                .refusals
                .with_label_values(&["tenant:t", "audit"])
                .get(),
            1
        );
    });
}

#[test]
fn a_model_without_a_price_is_refused_unless_allowed() {
    at("2026-12-02T10:00:00Z");
    let specs = [spec("tenant:t", 1.0, Mode::Block, "UTC")];
    run(async {
        let e = engine(BudgetSettings::default());
        assert!(matches!(
            e.admit(&ask(&specs, Some("unpriced"), 10)).await,
            Err(Refusal::Unpriced)
        ));
        assert!(matches!(
            e.admit(&ask(&specs, None, 10)).await,
            Err(Refusal::Unpriced)
        ));
        let allowed = engine(BudgetSettings {
            allow_unpriced: true,
            ..BudgetSettings::default()
        });
        let h = allowed
            .admit(&ask(&specs, Some("unpriced"), 10))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(h.decision, "unpriced");
        assert_eq!(h.settlement(None, "ok", 5), 0);
    });
}

/// A group budget is one more budget on each member's requests: two tenants each under
/// their own cap fill the group's, and then neither is served.
#[test]
fn a_group_budget_stops_every_member() {
    at("2026-12-02T10:00:00Z");
    let e = engine(BudgetSettings::default());
    let group = spec("group:g", 0.006, Mode::Block, "UTC");
    let a = [spec("tenant:a", 1.0, Mode::Block, "UTC"), group.clone()];
    let b = [spec("tenant:b", 1.0, Mode::Block, "UTC"), group];
    run(async {
        let ask_a = Ask {
            tenant: "a",
            ..ask(&a, Some("m"), 1000)
        };
        let ask_b = Ask {
            tenant: "b",
            ..ask(&b, Some("m"), 1000)
        };
        let _ha = e.admit(&ask_a).await.unwrap().unwrap();
        let _hb = e.admit(&ask_b).await.unwrap().unwrap();
        let Err(Refusal::Exceeded(room)) = e.admit(&ask_a).await else {
            panic!("the group's cap let a third in");
        };
        assert_eq!(room.budget, "group:g");
        // The tenant's own budget did not keep the refused reservation.
        let own = e.local.level("tenant:a", a[0].window_at(clock()));
        assert_eq!(own.reserved, 3_000_000);
    });
}

#[test]
fn the_observed_reservation_uses_what_the_tenant_produced() {
    at("2026-12-02T10:00:00Z");
    let e = engine(BudgetSettings {
        reservation: Reservation::Observed { percentile: 0.95 },
        ..BudgetSettings::default()
    });
    let specs = [spec("tenant:t", 10.0, Mode::Block, "UTC")];
    run(async {
        // No history: max_tokens (100k output tokens, $0.2) is reserved.
        let h = held(&e, &specs, Some("m"), 100_000).await;
        assert!((h.reserved_usd() - 0.201).abs() < 1e-9);
        h.settle(0, Some(50)).await;
        for _ in 0..30 {
            e.observed.add("t", "m", 50);
        }
        let h = held(&e, &specs, Some("m"), 100_000).await;
        // 1000 input tokens and 50 output tokens.
        assert!(
            (h.reserved_usd() - 0.0011).abs() < 1e-9,
            "{}",
            h.reserved_usd()
        );
        // The stream asks for more at three quarters of 50 tokens, and is not cut while
        // the budget has room.
        assert!(!h.watch(40));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!h.watch(60));
        assert!(h.reserved_usd() > 0.0011);
    });
}

#[test]
fn a_stream_past_what_the_budget_can_cover_is_cut() {
    at("2026-12-02T10:00:00Z");
    let e = engine(BudgetSettings::default());
    // Room for the first reservation (1000 in, 100 out: $0.0012) and a little more.
    let specs = [spec("tenant:t", 0.0013, Mode::Block, "UTC")];
    run(async {
        let h = held(&e, &specs, Some("m"), 100).await;
        assert!(!h.watch(80));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        // The extension (256 tokens, $0.000512) did not fit: cut once past 100 tokens.
        assert!(!h.watch(100));
        assert!(h.watch(101));
        let settled = h.settlement(None, "budget_exceeded", 101);
        assert_eq!(settled, nano(1000.0 * 1e-6 + 101.0 * 2e-6));
    });
}

/// A WebSocket session is watched in dollars: more is reserved ahead of need, and the
/// session is cut only past what is covered once more was refused.
#[test]
fn a_session_is_watched_in_dollars() {
    at("2026-12-02T10:00:00Z");
    let e = engine(BudgetSettings::default());
    // Room for one more first reservation ($0.0012) beyond the first, not two.
    let specs = [spec("tenant:t", 0.003, Mode::Block, "UTC")];
    run(async {
        let h = held(&e, &specs, Some("m"), 100).await;
        // $0.0005 spent: below three quarters, nothing asked.
        assert!(!h.watch_spent(300, 0, 100));
        assert!((h.reserved_usd() - 0.0012).abs() < 1e-12);
        // $0.001: more is asked for, and granted.
        assert!(!h.watch_spent(800, 0, 100));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(
            (h.reserved_usd() - 0.0024).abs() < 1e-12,
            "{}",
            h.reserved_usd()
        );
        // $0.002: more again, refused (the cap is $0.003); not cut while covered.
        assert!(!h.watch_spent(1800, 0, 100));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(
            (h.reserved_usd() - 0.0024).abs() < 1e-12,
            "{}",
            h.reserved_usd()
        );
        assert!(!h.watch_spent(1900, 0, 200));
        // Past $0.0024: cut.
        assert!(h.watch_spent(2100, 0, 200));
    });
}

/// An extension that is granted after its stream settled (the stream ended while the
/// reservation was on its way) gives itself back: nothing stays reserved.
#[test]
fn an_extension_granted_after_the_settlement_gives_itself_back() {
    at("2026-12-02T10:00:00Z");
    let e = engine(BudgetSettings::default());
    let specs = [spec("tenant:t", 1.0, Mode::Block, "UTC")];
    run(async {
        let h = held(&e, &specs, Some("m"), 100).await;
        // The extension is spawned here; on this single-threaded runtime it runs only
        // once the test yields, after the settlement below.
        assert!(!h.watch(90));
        let actual = h.settlement(Some(0.0005), "ok", 0);
        h.settle(actual, Some(90)).await;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let level = e.local.level("tenant:t", specs[0].window_at(clock()));
        assert_eq!((level.spent, level.reserved), (500_000, 0));
    });
}
