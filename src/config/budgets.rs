//! `tenants[].budget`, `groups` and `budgets`: each tenant's budgets (its own, each of
//! its groups', scoped ones) as the budget engine takes them.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::error::{invalid, ConfigError, Problem};
use super::raw::{RawBudget, RawBudgetList, RawBudgets, RawGroup};
use crate::budget::window::{time_zone, Period};
use crate::budget::{BudgetSettings, BudgetSpec, Mode, Reservation};

pub fn settings(raw: &RawBudgets) -> Result<BudgetSettings, ConfigError> {
    let reservation = match raw.reservation.as_deref().unwrap_or("worst_case") {
        "worst_case" => Reservation::WorstCase,
        "observed" => {
            let p = raw.observed_percentile.unwrap_or(0.95);
            if !(p > 0.0 && p <= 1.0) {
                return Err(invalid("budgets.observed_percentile", Problem::Percentile));
            }
            Reservation::Observed { percentile: p }
        }
        other => {
            return Err(invalid(
                "budgets.reservation",
                Problem::OneOf(other.into(), "worst_case, observed"),
            ))
        }
    };
    Ok(BudgetSettings {
        reservation,
        allow_unpriced: raw.allow_unpriced,
    })
}

/// The budgets of each tenant (by id): its own first, then its groups' in file order.
pub fn by_tenant(
    tenants: &[(String, Option<RawBudgetList>)],
    groups: &[RawGroup],
    routes: &HashSet<&str>,
) -> Result<HashMap<String, Vec<Arc<BudgetSpec>>>, ConfigError> {
    let mut out: HashMap<String, Vec<Arc<BudgetSpec>>> = HashMap::new();
    for (i, (id, list)) in tenants.iter().enumerate() {
        let own = out.entry(id.clone()).or_default();
        if let Some(list) = list {
            let at = format!("tenants[{i}].budget");
            own.extend(specs(&at, &format!("tenant:{id}"), list, routes)?);
        }
    }
    let mut group_ids = HashSet::new();
    for (g, group) in groups.iter().enumerate() {
        let at = format!("groups[{g}]");
        if group.id.is_empty() {
            return Err(invalid(format!("{at}.id"), Problem::Empty));
        }
        if !group_ids.insert(group.id.as_str()) {
            return Err(invalid(
                format!("{at}.id"),
                Problem::TenantTaken(group.id.clone()),
            ));
        }
        let budgets = specs(
            &format!("{at}.budget"),
            &format!("group:{}", group.id),
            &group.budget,
            routes,
        )?;
        for (m, member) in group.members.iter().enumerate() {
            let Some(list) = out.get_mut(member) else {
                return Err(invalid(
                    format!("{at}.members[{m}]"),
                    Problem::NoSuchTenant(member.clone()),
                ));
            };
            list.extend(budgets.iter().cloned());
        }
    }
    Ok(out)
}

/// One list's budgets, named `owner` plus their scope; no two with the same scope.
fn specs(
    at: &str,
    owner: &str,
    list: &RawBudgetList,
    routes: &HashSet<&str>,
) -> Result<Vec<Arc<BudgetSpec>>, ConfigError> {
    let many = matches!(list, RawBudgetList::Many(_));
    let mut ids = HashSet::new();
    let mut out = Vec::new();
    for (k, raw) in list.as_slice().iter().enumerate() {
        let at = if many {
            format!("{at}[{k}]")
        } else {
            at.to_string()
        };
        let spec = spec(&at, owner, raw, routes)?;
        if !ids.insert(spec.id.clone()) {
            return Err(invalid(at, Problem::BudgetScopeTaken(spec.id)));
        }
        out.push(Arc::new(spec));
    }
    Ok(out)
}

fn spec(
    at: &str,
    owner: &str,
    raw: &RawBudget,
    routes: &HashSet<&str>,
) -> Result<BudgetSpec, ConfigError> {
    if !(raw.usd >= 0.0 && raw.usd.is_finite()) {
        return Err(invalid(format!("{at}.usd"), Problem::Dollars));
    }
    let period = Period::parse(&raw.per).ok_or_else(|| {
        invalid(
            format!("{at}.per"),
            Problem::OneOf(raw.per.clone(), "day, week, month"),
        )
    })?;
    let tz_name = raw.time_zone.clone().unwrap_or_else(|| "UTC".into());
    let tz = time_zone(&tz_name).ok_or_else(|| {
        invalid(
            format!("{at}.time_zone"),
            Problem::TimeZone(tz_name.clone()),
        )
    })?;
    let mode = match raw.mode.as_deref().unwrap_or("block") {
        "block" => Mode::Block,
        "audit" => Mode::Audit,
        other => {
            return Err(invalid(
                format!("{at}.mode"),
                Problem::OneOf(other.into(), "block, audit"),
            ))
        }
    };
    let cut_running = match raw.running.as_deref().unwrap_or("cut") {
        "cut" => true,
        "finish" => false,
        other => {
            return Err(invalid(
                format!("{at}.running"),
                Problem::OneOf(other.into(), "cut, finish"),
            ))
        }
    };
    if let Some(r) = &raw.route {
        if !routes.contains(r.as_str()) {
            return Err(invalid(
                format!("{at}.route"),
                Problem::NoSuchRoute(r.clone()),
            ));
        }
    }
    let mut id = owner.to_string();
    if let Some(m) = &raw.model {
        id.push_str(&format!(":model:{m}"));
    }
    if let Some(r) = &raw.route {
        id.push_str(&format!(":route:{r}"));
    }
    Ok(BudgetSpec {
        id,
        usd: raw.usd,
        period,
        time_zone: tz,
        time_zone_name: tz_name,
        mode,
        cut_running,
        model: raw.model.clone(),
        route: raw.route.clone(),
    })
}
