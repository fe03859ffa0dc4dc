//! An in-memory [`ServiceMaps`] with capacity limits and fault injection, for
//! reconciler tests (Cilium's fake `LBMaps` plays the same role).
use std::collections::BTreeMap;

use proxy_common::{
    backend::{Backend, Backend6},
    svc::{Svc6Key, SvcKey, SvcValue},
};

use super::maps::{MapsDump, ServiceMaps};
use crate::error::{Error, Result};

#[derive(Debug, Default, Clone)]
pub struct FakeMaps {
    pub svc: BTreeMap<SvcKey, SvcValue>,
    pub backends: BTreeMap<u32, Backend>,
    pub svc6: BTreeMap<Svc6Key, SvcValue>,
    pub backends6: BTreeMap<u32, Backend6>,
    pub names: BTreeMap<u32, String>,
    pub ranges: std::collections::BTreeSet<(u32, std::net::Ipv4Addr, u8)>,
    /// Every write in order, for asserting write order and minimality.
    pub log: Vec<String>,
    /// Fail the n-th write from now (0 = the next one).
    pub fail_write_at: Option<usize>,
    pub svc_capacity: Option<usize>,
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

    fn write_name(&mut self, svc_id: u32, name: &str) -> Result<()> {
        self.step(format!("name+ {svc_id}"))?;
        self.names.insert(svc_id, name.to_owned());
        Ok(())
    }

    fn delete_name(&mut self, svc_id: u32) -> Result<()> {
        self.step(format!("name- {svc_id}"))?;
        self.names.remove(&svc_id);
        Ok(())
    }

    fn write_range(&mut self, svc_id: u32, (a, l): (std::net::Ipv4Addr, u8)) -> Result<()> {
        self.step(format!("range+ {svc_id} {a}/{l}"))?;
        self.ranges.insert((svc_id, a, l));
        Ok(())
    }

    fn delete_range(&mut self, svc_id: u32, (a, l): (std::net::Ipv4Addr, u8)) -> Result<()> {
        self.step(format!("range- {svc_id} {a}/{l}"))?;
        self.ranges.remove(&(svc_id, a, l));
        Ok(())
    }
}
