// Package backoff computes retry waits.
package backoff

import "time"

// Exponential is the wait after the given number of failed attempts: minWait after the first,
// doubling after each further one, never above maxWait.
func Exponential(minWait, maxWait time.Duration, attempts int) time.Duration {
	wait := minWait
	for i := 1; i < attempts && wait < maxWait; i++ {
		wait *= 2
	}
	return min(wait, maxWait)
}
