package aggregator

import (
	"context"
	"errors"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meterd/meterd/internal/ctxtime"
	"github.com/meterd/meterd/internal/promreg"
	"github.com/meterd/meterd/internal/quiet"
)

// ReconcilerConfig configures a Reconciler.
type ReconcilerConfig struct {
	Store Store
	// Lookback is how many closed hours are verified at start, where a crash
	// between a raw write and its rollup write would show (default 6h).
	Lookback time.Duration
	// Every is how often newly closed hours are verified (default 10m).
	Every time.Duration
	// Settle is how long after an hour closes it is first verified, so that
	// batches in flight land first (default 5m).
	Settle time.Duration
	Now    func() time.Time
	// Logger receives the reconciler's logs; nil discards them.
	Logger     *slog.Logger
	Registerer prometheus.Registerer
}

// Reconciler verifies the hourly rollups against the raw events, which are
// the source of truth, and repairs any difference: every closed hour once
// after it settled, and the last Lookback hours at start. It never scans all
// raw events: each hour is read once per process lifetime.
type Reconciler struct {
	cfg     ReconcilerConfig
	log     *slog.Logger
	repairs prometheus.Counter
	done    time.Time // hours before this are verified
}

// NewReconciler builds a Reconciler.
func NewReconciler(cfg ReconcilerConfig) (*Reconciler, error) {
	if cfg.Store == nil {
		return nil, errors.New("aggregator: reconciler needs a store")
	}
	orDefault(&cfg.Lookback, 6*time.Hour)
	orDefault(&cfg.Every, 10*time.Minute)
	orDefault(&cfg.Settle, 5*time.Minute)
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	quiet.Defaults(&cfg.Logger, &cfg.Registerer)
	r := &Reconciler{cfg: cfg, log: cfg.Logger.With("component", "reconciler")}
	s := promreg.On(cfg.Registerer)
	r.repairs = s.Counter("meterd_aggregator_rollup_repairs_total", "Hourly rollup rows found different from the raw events and repaired.")
	if err := s.Err(); err != nil {
		return nil, err
	}
	return r, nil
}

// Run verifies hours until ctx ends.
func (r *Reconciler) Run(ctx context.Context) error {
	ctxtime.Every(ctx, r.cfg.Every, func() {
		switch err := r.Once(ctx); {
		case err == nil || ctx.Err() != nil:
		case errors.Is(err, ErrNotWriter):
			// A standby aggregator: the lease holder reconciles.
			r.log.Debug("not the writer; reconciling at the next round", "err", err)
		default:
			r.log.Warn("reconcile failed; retrying at the next round", "err", err)
		}
	})
	return nil
}

// Once verifies every settled hour not verified yet (the Lookback window on
// the first call) and returns after repairing what differed.
func (r *Reconciler) Once(ctx context.Context) error {
	upTo := r.cfg.Now().Add(-r.cfg.Settle).UTC().Truncate(time.Hour)
	from := r.done
	if from.IsZero() {
		from = upTo.Add(-r.cfg.Lookback)
	}
	if !from.Before(upTo) {
		return nil
	}
	n, err := r.cfg.Store.Reconcile(ctx, from, upTo)
	if err != nil {
		return err
	}
	if n > 0 {
		r.repairs.Add(float64(n))
		r.log.Warn("repaired hourly rollups from raw events", "rows", n, "from", from, "to", upTo)
	}
	r.done = upTo
	return nil
}
