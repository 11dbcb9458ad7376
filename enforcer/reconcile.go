package enforcer

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"time"

	"github.com/meterd/meterd/catalog"
	"github.com/meterd/meterd/schemas"
)

// reconciler reads usage totals from the store into the tracker: the seed
// at start, the reconcile every Config.ReconcileEvery, and the reseed of
// tenants whose period changed or whose read failed.
type reconciler struct {
	store UsageSource
	track *tracker
	log   *slog.Logger
	m     *metrics
	every time.Duration
}

// errUnseeded is returned by reconcile when the store answered but not for
// some tenants: every other tenant was set, and those wait for a reseed,
// keeping their decisions meanwhile.
var errUnseeded = errors.New("enforcer: the usage of some tenants could not be read from the store")

// reconcile recomputes the usage of tenants (nil: all) from the store, with
// one Totals query per distinct current period, and replaces the in-memory
// usage by it plus the increments that arrived since that query started.
func (r *reconciler) reconcile(ctx context.Context, tenants []string) error {
	start := time.Now()
	groups := r.track.groupsOf(tenants)
	var errs, unseeded []error
	queried, corrected := 0, 0
	for _, g := range groups {
		n, c, failed, err := r.reconcilePeriod(ctx, g.period, g.tenants)
		if err != nil {
			errs = append(errs, err)
		}
		unseeded = append(unseeded, failed...)
		queried, corrected = queried+n, corrected+c
	}
	r.m.corrections.Add(float64(corrected))
	if len(errs) > 0 {
		r.m.reconciles.WithLabelValues("error").Inc()
		return errors.Join(errs...)
	}
	if len(unseeded) > 0 {
		r.m.reconciles.WithLabelValues("error").Inc()
		return fmt.Errorf("%w: %w", errUnseeded, errors.Join(unseeded...))
	}
	r.m.reconciles.WithLabelValues("ok").Inc()
	r.log.Debug("usage reconciled", "tenants", queried, "periods", len(groups), "corrected", corrected, "took", time.Since(start))
	return nil
}

// reconcilePeriod reconciles tenants whose current period is p with one
// Totals query. If that fails while the store answers a ping, something in
// the data may break the query (as SQLite's overflowing sum once did for
// every tenant): it reads the tenants one by one, so that it costs only the
// tenant whose query fails its seed; failed holds their errors, and they
// wait for a reseed. err is set when the store did not answer at all. It
// returns how many tenants it set and how many meters it corrected.
func (r *reconciler) reconcilePeriod(ctx context.Context, p catalog.Period, tenants []string) (set, corrected int, failed []error, err error) {
	set, corrected, err = r.read(ctx, p, tenants, func(ctx context.Context) ([]schemas.Increment, error) {
		return r.store.Totals(ctx, p.Start, p.End)
	})
	if err == nil || ctx.Err() != nil {
		return set, corrected, nil, err
	}
	if perr := r.store.Ping(ctx); perr != nil {
		return 0, 0, nil, err // the store is away: every tenant waits alike
	}
	r.log.Warn("reading the usage of all tenants failed while the store answers; reading tenant by tenant", "period", p, "err", err)
	for _, t := range tenants {
		n, c, terr := r.read(ctx, p, []string{t}, func(ctx context.Context) ([]schemas.Increment, error) {
			return r.store.TenantTotals(ctx, t, p.Start, p.End)
		})
		set, corrected = set+n, corrected+c
		if terr != nil {
			failed = append(failed, fmt.Errorf("tenant %s: %w", t, terr))
			r.track.reseedLater(t)
		}
	}
	return set, corrected, failed, nil
}

// read sets the usage of tenants, whose current period is p, to the totals
// query returns plus the increments that arrived since it started. It
// returns how many tenants it set and how many meters it corrected.
func (r *reconciler) read(ctx context.Context, p catalog.Period, tenants []string,
	query func(context.Context) ([]schemas.Increment, error)) (set, corrected int, err error) {
	j := r.track.beginRead(p, tenants)
	incs, err := query(ctx)
	set, corrected = r.track.endRead(j, incs, err)
	if err != nil {
		return 0, 0, fmt.Errorf("totals of %s: %w", p, err)
	}
	return set, corrected, nil
}

// loop reconciles every tenant each every, and the tenants waiting for a
// reseed as soon as they wait; retrySoon has those tried again after a
// short pause, as after a failed reconcile.
func (r *reconciler) loop(ctx context.Context, retrySoon bool) {
	tick := time.NewTicker(r.every)
	defer tick.Stop()
	var retryC <-chan time.Time // nil: no retry pending
	if retrySoon {
		retryC = time.After(writeRetry)
	}
	for {
		var tenants []string // nil: all
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		case <-r.track.reseedWake:
			tenants = r.track.waitingReseed()
		case <-retryC:
			tenants = r.track.waitingReseed()
		}
		if tenants != nil && len(tenants) == 0 {
			continue
		}
		retryC = nil
		if err := r.reconcile(ctx, tenants); err != nil && ctx.Err() == nil {
			r.log.Warn("reconciling usage with the store failed", "err", err)
			retryC = time.After(writeRetry)
		}
	}
}

// reseedNow reads tenant's usage from the store if it waits for a reseed
// (its period is new), before the admin API answers.
func (r *reconciler) reseedNow(ctx context.Context, tenant string) {
	if !slices.Contains(r.track.waitingReseed(), tenant) {
		return
	}
	if err := r.reconcile(ctx, []string{tenant}); err != nil {
		r.log.Warn("reading a changed tenant's usage failed; retrying in the background", "tenant", tenant, "err", err)
	}
}
