//! The device lifecycle on [`MmioTransport`]: Status and feature
//! negotiation, activation, reset, notifications, interrupts and
//! DEVICE_NEEDS_RESET.

use log::{debug, info, warn};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};

use crate::device::{QueueConfig, TransportDevice};
use crate::transport::MmioTransport;

/// Status bits the driver may set.
const DRIVER_BITS: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE
    | VIRTIO_CONFIG_S_DRIVER
    | VIRTIO_CONFIG_S_DRIVER_OK
    | VIRTIO_CONFIG_S_FEATURES_OK
    | VIRTIO_CONFIG_S_FAILED;

impl MmioTransport {
    /// The features offered to the driver: the device's and `VIRTIO_F_VERSION_1`.
    pub(crate) fn offered<D: TransportDevice + ?Sized>(dev: &D) -> u64 {
        dev.device_features() | (1 << VIRTIO_F_VERSION_1)
    }

    /// True while the device runs: DRIVER_OK is set and DEVICE_NEEDS_RESET
    /// is clear, in the transport's bits and in the device's.
    pub fn is_active<D: TransportDevice + ?Sized>(&self, dev: &D) -> bool {
        let status = self.status | dev.device_status();
        status & VIRTIO_CONFIG_S_DRIVER_OK != 0 && status & VIRTIO_CONFIG_S_NEEDS_RESET == 0
    }

    /// A driver write of `value` to Status.
    pub(crate) fn set_status<D: TransportDevice + ?Sized>(&mut self, dev: &mut D, value: u32) {
        if value == 0 {
            self.reset(dev);
            return;
        }
        let mut value = value & DRIVER_BITS;
        let newly = value & !self.status;
        if newly & VIRTIO_CONFIG_S_FEATURES_OK != 0 && !self.features_acceptable(dev) {
            warn!(
                "virtio device {}: refusing driver features {:#x} (offered {:#x})",
                dev.device_type(),
                self.driver_features,
                Self::offered(dev)
            );
            value &= !VIRTIO_CONFIG_S_FEATURES_OK;
        }
        let features_ok = (self.status | value) & VIRTIO_CONFIG_S_FEATURES_OK != 0;
        let activate = newly & VIRTIO_CONFIG_S_DRIVER_OK != 0 && features_ok;
        if newly & VIRTIO_CONFIG_S_DRIVER_OK != 0 && !features_ok {
            warn!(
                "virtio device {}: DRIVER_OK without FEATURES_OK",
                dev.device_type()
            );
            value &= !VIRTIO_CONFIG_S_DRIVER_OK;
        }
        // Bits only ever accumulate; a driver clears them by writing 0.
        self.status |= value;
        if activate {
            debug!(
                "virtio device {}: driver ready, features {:#x}",
                dev.device_type(),
                self.driver_features
            );
            if let Err(e) = dev.activate(self.driver_features, &self.queues) {
                warn!(
                    "virtio device {}: activation failed: {}",
                    dev.device_type(),
                    outboard_protocol::error_chain(&e)
                );
                self.set_needs_reset(dev);
            }
        }
    }

    fn features_acceptable<D: TransportDevice + ?Sized>(&self, dev: &D) -> bool {
        self.driver_features & !Self::offered(dev) == 0
            && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0
    }

    /// Resets the transport's registers (queues, features, selectors,
    /// Status, InterruptStatus) and then the device. ConfigGeneration keeps
    /// counting.
    pub fn reset<D: TransportDevice + ?Sized>(&mut self, dev: &mut D) {
        info!("virtio device {}: reset", dev.device_type());
        self.queues = self
            .max_sizes
            .iter()
            .map(|&n| QueueConfig::new(n))
            .collect();
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt_status = 0;
        dev.reset();
    }

    /// A notification of queue `index`, from QueueNotify or another path
    /// (a doorbell). Dropped unless the device is active (see
    /// [`MmioTransport::is_active`]) and the queue exists and is ready;
    /// otherwise passed to [`TransportDevice::queue_notify`].
    pub fn notify<D: TransportDevice + ?Sized>(&mut self, dev: &mut D, index: u16) {
        if !self.is_active(dev) {
            debug!(
                "virtio device {}: notify of queue {index} while inactive",
                dev.device_type()
            );
            return;
        }
        if !self.queues.get(usize::from(index)).is_some_and(|q| q.ready) {
            debug!(
                "virtio device {}: notify of missing or unready queue {index}",
                dev.device_type()
            );
            return;
        }
        match dev.queue_notify(index) {
            Ok(true) => self.raise(dev, VIRTIO_MMIO_INT_VRING),
            Ok(false) => {}
            Err(e) => {
                warn!(
                    "virtio device {}: queue {index} failed: {}",
                    dev.device_type(),
                    outboard_protocol::error_chain(&e)
                );
                self.set_needs_reset(dev);
            }
        }
    }

    /// Latches InterruptStatus `bits` and calls [`TransportDevice::interrupt`].
    pub fn raise<D: TransportDevice + ?Sized>(&mut self, dev: &mut D, bits: u32) {
        self.interrupt_status |= bits;
        dev.interrupt(bits);
    }

    /// Sets DEVICE_NEEDS_RESET and raises a configuration-change interrupt,
    /// once until the next reset. Notifications are dropped from then on.
    pub fn set_needs_reset<D: TransportDevice + ?Sized>(&mut self, dev: &mut D) {
        if self.status & VIRTIO_CONFIG_S_NEEDS_RESET == 0 {
            warn!("virtio device {}: device needs reset", dev.device_type());
            self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
            self.raise(dev, VIRTIO_MMIO_INT_CONFIG);
        }
    }

    /// The device changed its configuration space on its own: increments
    /// ConfigGeneration and raises a configuration-change interrupt.
    pub fn config_changed<D: TransportDevice + ?Sized>(&mut self, dev: &mut D) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.raise(dev, VIRTIO_MMIO_INT_CONFIG);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdev::{r, setup, w, Dummy, DRIVER_OK_STATUS};
    use virtio_bindings::virtio_mmio::*;

    fn features(t: &mut MmioTransport, d: &mut Dummy, f: u64) {
        w(t, d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        w(t, d, VIRTIO_MMIO_DRIVER_FEATURES, f as u32);
        w(t, d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w(t, d, VIRTIO_MMIO_DRIVER_FEATURES, (f >> 32) as u32);
    }

    const V1: u64 = 1 << VIRTIO_F_VERSION_1;

    #[test]
    fn features_ok_when_subset_with_version_1_then_accepted() {
        let (mut t, mut d) = setup();
        d.features = 0b110;
        features(&mut t, &mut d, V1 | 0b100);
        w(
            &mut t,
            &mut d,
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_FEATURES_OK,
        );
        assert_eq!(
            r(&mut t, &mut d, VIRTIO_MMIO_STATUS),
            VIRTIO_CONFIG_S_FEATURES_OK
        );
    }

    #[test]
    fn features_ok_when_feature_not_offered_then_refused() {
        let (mut t, mut d) = setup();
        d.features = 0b010;
        features(&mut t, &mut d, V1 | 0b100);
        w(
            &mut t,
            &mut d,
            VIRTIO_MMIO_STATUS,
            3 | VIRTIO_CONFIG_S_FEATURES_OK,
        );
        assert_eq!(r(&mut t, &mut d, VIRTIO_MMIO_STATUS), 3);
    }

    #[test]
    fn features_ok_when_version_1_missing_then_refused() {
        let (mut t, mut d) = setup();
        d.features = 0b010;
        features(&mut t, &mut d, 0b010);
        w(
            &mut t,
            &mut d,
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_FEATURES_OK,
        );
        assert_eq!(r(&mut t, &mut d, VIRTIO_MMIO_STATUS), 0);
    }

    #[test]
    fn driver_ok_when_features_ok_missing_then_refused_and_not_activated() {
        let (mut t, mut d) = setup();
        features(&mut t, &mut d, V1);
        w(
            &mut t,
            &mut d,
            VIRTIO_MMIO_STATUS,
            3 | VIRTIO_CONFIG_S_DRIVER_OK,
        );
        assert_eq!(r(&mut t, &mut d, VIRTIO_MMIO_STATUS), 3);
        assert!(d.activated.is_empty());
        assert!(!t.is_active(&d));
    }

    #[test]
    fn driver_ok_when_features_ok_then_activate_gets_features_and_queues() {
        let (mut t, mut d) = setup();
        d.make_active(&mut t);
        assert_eq!(r(&mut t, &mut d, VIRTIO_MMIO_STATUS), DRIVER_OK_STATUS);
        assert!(t.is_active(&d));
        assert_eq!(d.activated.len(), 1);
        let (f, queues) = &d.activated[0];
        assert_eq!(*f, V1);
        assert_eq!(queues.len(), 2);
        assert!(queues[0].ready && !queues[1].ready);
        assert_eq!(
            (queues[0].desc, queues[0].avail, queues[0].used),
            (0x1000, 0x2000, 0x3000)
        );
        w(&mut t, &mut d, VIRTIO_MMIO_STATUS, DRIVER_OK_STATUS);
        assert_eq!(d.activated.len(), 1, "activated once");
    }

    #[test]
    fn status_when_driver_writes_fewer_bits_then_bits_stay() {
        let (mut t, mut d) = setup();
        d.make_active(&mut t);
        w(
            &mut t,
            &mut d,
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE,
        );
        assert_eq!(r(&mut t, &mut d, VIRTIO_MMIO_STATUS), DRIVER_OK_STATUS);
        w(
            &mut t,
            &mut d,
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_NEEDS_RESET | 0x100,
        );
        assert_eq!(r(&mut t, &mut d, VIRTIO_MMIO_STATUS), DRIVER_OK_STATUS);
    }

    #[test]
    fn activate_when_device_fails_then_needs_reset_and_config_interrupt() {
        let (mut t, mut d) = setup();
        d.fail_activate = true;
        d.make_active(&mut t);
        let s = r(&mut t, &mut d, VIRTIO_MMIO_STATUS);
        assert_eq!(s, DRIVER_OK_STATUS | VIRTIO_CONFIG_S_NEEDS_RESET);
        assert_eq!(d.interrupts, vec![VIRTIO_MMIO_INT_CONFIG]);
        assert_eq!(r(&mut t, &mut d, VIRTIO_MMIO_INTERRUPT_STATUS), 2);
        assert!(!t.is_active(&d));
    }

    #[test]
    fn queue_notify_when_active_then_dispatched_and_used_raises_vring() {
        let (mut t, mut d) = setup();
        d.make_active(&mut t);
        w(&mut t, &mut d, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(d.notified, vec![0]);
        assert!(d.interrupts.is_empty(), "nothing used");
        d.notify_uses = true;
        t.notify(&mut d, 0);
        assert_eq!(d.notified, vec![0, 0]);
        assert_eq!(d.interrupts, vec![VIRTIO_MMIO_INT_VRING]);
        assert_eq!(r(&mut t, &mut d, VIRTIO_MMIO_INTERRUPT_STATUS), 1);
    }

    #[test]
    fn queue_notify_when_inactive_missing_or_unready_then_dropped() {
        let (mut t, mut d) = setup();
        w(&mut t, &mut d, VIRTIO_MMIO_QUEUE_READY, 1);
        w(&mut t, &mut d, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert!(d.notified.is_empty(), "before DRIVER_OK");
        d.make_active(&mut t);
        for q in [1, 2, 0x1_0000] {
            w(&mut t, &mut d, VIRTIO_MMIO_QUEUE_NOTIFY, q);
        }
        assert!(d.notified.is_empty(), "queue 1 unready, 2 missing");
        d.external_status = VIRTIO_CONFIG_S_NEEDS_RESET;
        t.notify(&mut d, 0);
        assert!(d.notified.is_empty(), "device reports NEEDS_RESET");
        assert_eq!(
            r(&mut t, &mut d, VIRTIO_MMIO_STATUS),
            DRIVER_OK_STATUS | VIRTIO_CONFIG_S_NEEDS_RESET
        );
    }

    #[test]
    fn queue_notify_when_device_fails_then_needs_reset_once_and_notifies_dropped() {
        let (mut t, mut d) = setup();
        d.make_active(&mut t);
        d.fail_notify = true;
        t.notify(&mut d, 0);
        t.set_needs_reset(&mut d);
        assert_eq!(d.interrupts, vec![VIRTIO_MMIO_INT_CONFIG], "raised once");
        assert_ne!(t.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        t.notify(&mut d, 0);
        assert_eq!(d.notified, vec![0], "dropped after NEEDS_RESET");
    }

    #[test]
    fn interrupt_ack_when_written_then_latched_bits_cleared_and_hook_called() {
        let (mut t, mut d) = setup();
        t.raise(&mut d, VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG);
        d.external_interrupts = VIRTIO_MMIO_INT_VRING;
        w(
            &mut t,
            &mut d,
            VIRTIO_MMIO_INTERRUPT_ACK,
            VIRTIO_MMIO_INT_CONFIG,
        );
        assert_eq!(r(&mut t, &mut d, VIRTIO_MMIO_INTERRUPT_STATUS), 1);
        w(
            &mut t,
            &mut d,
            VIRTIO_MMIO_INTERRUPT_ACK,
            VIRTIO_MMIO_INT_VRING,
        );
        assert_eq!(r(&mut t, &mut d, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        assert_eq!(d.acked, vec![2, 1]);
        assert_eq!(t.interrupt_status(), 0);
    }

    #[test]
    fn status_zero_when_written_then_transport_and_device_reset() {
        let (mut t, mut d) = setup();
        d.make_active(&mut t);
        t.set_needs_reset(&mut d);
        w(&mut t, &mut d, VIRTIO_MMIO_QUEUE_SEL, 1);
        w(&mut t, &mut d, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(d.resets, 1);
        assert_eq!(r(&mut t, &mut d, VIRTIO_MMIO_STATUS), 0);
        assert_eq!(r(&mut t, &mut d, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        assert_eq!(t.driver_features(), 0);
        assert_eq!(t.queues()[0], QueueConfig::new(8));
        assert_eq!(
            r(&mut t, &mut d, VIRTIO_MMIO_QUEUE_NUM_MAX),
            8,
            "queue 0 selected"
        );
        d.make_active(&mut t);
        assert!(t.is_active(&d), "usable again after reset");
    }

    #[test]
    fn config_changed_when_called_then_generation_and_config_interrupt() {
        let (mut t, mut d) = setup();
        t.config_changed(&mut d);
        assert_eq!(r(&mut t, &mut d, VIRTIO_MMIO_CONFIG_GENERATION), 1);
        assert_eq!(d.interrupts, vec![VIRTIO_MMIO_INT_CONFIG]);
        t.reset(&mut d);
        assert_eq!(t.config_generation(), 1, "generation survives reset");
    }
}
