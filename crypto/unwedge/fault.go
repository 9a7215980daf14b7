//go:build unwedgefault

package unwedge

import "github.com/unwedge/unwedge/internal/fault"

// This file exists only in test builds (build tag unwedgefault, package fault): the product has
// no fault points to arm.

// ArmFaults makes hook run at the fault points of every heal of this Unwedger
// (FaultHealGranted, FaultSessionCreated), in its own context, which Stop ends. Call it before
// Start and before the first event.
func (u *Unwedger) ArmFaults(hook fault.Hook) { u.ctx = fault.With(u.ctx, hook) }

// ArmFaults makes hook run at the fault points of this recovery (FaultKeyArrived,
// FaultEventDelivered), in its own context, which Stop ends. Call it before Start.
func (r *Recovery) ArmFaults(hook fault.Hook) { r.ctx = fault.With(r.ctx, hook) }
