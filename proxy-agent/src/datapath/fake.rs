//! An in-memory [`ServiceMaps`] with capacity limits and fault injection, for
//! reconciler tests (Cilium's fake `LBMaps` plays the same role).
//!
//! A batch is taken entry by entry, in order, as the kernel takes it
//! (`generic_map_update_batch`): a failing entry stops it part-way, with
//! the entries before it written, which is what the reconciler must cope
//! with.
use std::collections::BTreeMap;

use proxy_common::{
    backend::{Backend, Backend6},
    names::SvcName,
    svc::{Svc6Key, SvcKey, SvcValue},
};

use super::maps::{BatchError, Delete, MapsDump, ServiceMaps, Update};
use crate::error::{Error, Result};

#[derive(Debug, Default, Clone)]
pub struct FakeMaps {
    pub svc: BTreeMap<SvcKey, SvcValue>,
    pub backends: BTreeMap<u32, Backend>,
    pub svc6: BTreeMap<Svc6Key, SvcValue>,
    pub backends6: BTreeMap<u32, Backend6>,
    pub names: BTreeMap<u32, String>,
    pub ranges: std::collections::BTreeSet<(u32, std::net::IpAddr, u8)>,
    /// Every write in order, for asserting write order and minimality.
    pub log: Vec<String>,
    /// Fail the n-th write (entry) from now (0 = the next one); a batch
    /// holding it stops there.
    pub fail_write_at: Option<usize>,
    pub svc_capacity: Option<usize>,
    /// Calls made (a batch is one call), and the largest batch.
    pub calls: usize,
    pub largest_batch: usize,
}

impl FakeMaps {
    fn step(&mut self, what: String) -> Result<()> {
        if let Some(n) = self.fail_write_at {
            if n == 0 {
                self.fail_write_at = None;
                return Err(Error::Injected("write failed"));
            }
            self.fail_write_at = Some(n - 1);
        }
        self.log.push(what);
        Ok(())
    }

    /// One call over `items`, entry by entry; stops at the first failure.
    fn batch<T>(&mut self, items: impl ExactSizeIterator<Item = T>, mut one: impl FnMut(&mut Self, T) -> Result<()>) -> Result<(), BatchError> {
        self.calls += 1;
        self.largest_batch = self.largest_batch.max(items.len());
        for (written, item) in items.enumerate() {
            one(self, item).map_err(|error| BatchError { written, error })?;
        }
        Ok(())
    }
}

impl ServiceMaps for FakeMaps {
    fn dump(&self) -> Result<MapsDump> {
        Ok(MapsDump {
            svc: self.svc.iter().map(|(k, v)| (*k, *v)).collect(),
            backends: self.backends.iter().map(|(k, v)| (*k, *v)).collect(),
            svc6: self.svc6.iter().map(|(k, v)| (*k, *v)).collect(),
            backends6: self.backends6.iter().map(|(k, v)| (*k, *v)).collect(),
            names: self.names.iter().map(|(k, v)| (*k, v.clone())).collect(),
            ranges: self.ranges.iter().copied().collect(),
        })
    }

    fn update(&mut self, batch: Update<'_>) -> Result<(), BatchError> {
        match batch {
            Update::Backends(k, v) => self.batch(k.iter().zip(v), |m, (k, v)| m.write_backend(*k, *v)),
            Update::Backends6(k, v) => self.batch(k.iter().zip(v), |m, (k, v)| m.write_backend6(*k, *v)),
            Update::Svc(k, v) => self.batch(k.iter().zip(v), |m, (k, v)| m.write_svc(*k, *v)),
            Update::Svc6(k, v) => self.batch(k.iter().zip(v), |m, (k, v)| m.write_svc6(*k, *v)),
            Update::Names(k, v) => self.batch(k.iter().zip(v), |m, (k, v)| m.write_name(*k, v)),
            Update::Ranges(r) => self.batch(r.iter(), |m, &(id, r)| m.write_range(id, r)),
        }
    }

    fn delete(&mut self, batch: Delete<'_>) -> Result<(), BatchError> {
        match batch {
            Delete::Backends(k) => self.batch(k.iter(), |m, k| m.delete_backend(*k)),
            Delete::Backends6(k) => self.batch(k.iter(), |m, k| m.delete_backend6(*k)),
            Delete::Svc(k) => self.batch(k.iter(), |m, k| m.delete_svc(*k)),
            Delete::Svc6(k) => self.batch(k.iter(), |m, k| m.delete_svc6(*k)),
            Delete::Names(k) => self.batch(k.iter(), |m, k| m.delete_name(*k)),
            Delete::Ranges(r) => self.batch(r.iter(), |m, &(id, r)| m.delete_range(id, r)),
        }
    }
}

/// One entry each.
impl FakeMaps {
    fn write_backend(&mut self, id: u32, backend: Backend) -> Result<()> {
        self.step(format!("backend+ {id}"))?;
        self.backends.insert(id, backend);
        Ok(())
    }

    fn delete_backend(&mut self, id: u32) -> Result<()> {
        self.step(format!("backend- {id}"))?;
        self.backends.remove(&id);
        Ok(())
    }

    fn write_svc(&mut self, key: SvcKey, value: SvcValue) -> Result<()> {
        if let Some(cap) = self.svc_capacity
            && !self.svc.contains_key(&key) && self.svc.len() >= cap {
                return Err(Error::Injected("svc map full"));
            }
        self.step(format!("svc+ {}:{} slot {}", key.addr_be, key.port_be, key.backend_slot))?;
        self.svc.insert(key, value);
        Ok(())
    }

    fn delete_svc(&mut self, key: SvcKey) -> Result<()> {
        self.step(format!("svc- {}:{} slot {}", key.addr_be, key.port_be, key.backend_slot))?;
        self.svc.remove(&key);
        Ok(())
    }

    fn write_backend6(&mut self, id: u32, backend: Backend6) -> Result<()> {
        self.step(format!("backend6+ {id}"))?;
        self.backends6.insert(id, backend);
        Ok(())
    }

    fn delete_backend6(&mut self, id: u32) -> Result<()> {
        self.step(format!("backend6- {id}"))?;
        self.backends6.remove(&id);
        Ok(())
    }

    fn write_svc6(&mut self, key: Svc6Key, value: SvcValue) -> Result<()> {
        if let Some(cap) = self.svc_capacity
            && !self.svc6.contains_key(&key) && self.svc.len() + self.svc6.len() >= cap {
                return Err(Error::Injected("svc map full"));
            }
        self.step(format!("svc6+ {}:{} slot {}", std::net::Ipv6Addr::from(key.addr), u16::from_be(key.port_be), key.backend_slot))?;
        self.svc6.insert(key, value);
        Ok(())
    }

    fn delete_svc6(&mut self, key: Svc6Key) -> Result<()> {
        self.step(format!("svc6- {}:{} slot {}", std::net::Ipv6Addr::from(key.addr), u16::from_be(key.port_be), key.backend_slot))?;
        self.svc6.remove(&key);
        Ok(())
    }

    fn write_name(&mut self, svc_id: u32, name: &SvcName) -> Result<()> {
        self.step(format!("name+ {svc_id}"))?;
        self.names.insert(svc_id, name.as_str().to_owned());
        Ok(())
    }

    fn delete_name(&mut self, svc_id: u32) -> Result<()> {
        self.step(format!("name- {svc_id}"))?;
        self.names.remove(&svc_id);
        Ok(())
    }

    fn write_range(&mut self, svc_id: u32, (a, l): (std::net::IpAddr, u8)) -> Result<()> {
        self.step(format!("range+ {svc_id} {a}/{l}"))?;
        self.ranges.insert((svc_id, a, l));
        Ok(())
    }

    fn delete_range(&mut self, svc_id: u32, (a, l): (std::net::IpAddr, u8)) -> Result<()> {
        self.step(format!("range- {svc_id} {a}/{l}"))?;
        self.ranges.remove(&(svc_id, a, l));
        Ok(())
    }
}
