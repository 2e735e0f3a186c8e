// Waiting for work the .NET way: a CancellationToken stops the wait (and,
// when asked, cancels the work itself); progress reaches the caller as
// IProgress<WorkProgress> read from the board, no Python call per report.
// The final answer is a typed status; work that ended failed or cancelled
// throws WorkFailedException when the caller asked for success only.
using System;
using System.Threading;
using System.Threading.Tasks;

namespace EmbeddedWorker
{
    public sealed partial class EmbeddedProcessingWorker
    {
        /// <summary>
        /// Wait until the session is final. Progress from the board. When `cancellationToken` fires the
        /// wait ends with OperationCanceledException, after cancelling the session if `cancelWorkOnCancel`.
        /// A poll that fails (not_found, unavailable) throws WorkerException; with `requireSuccess` a session
        /// that ends failed or cancelled throws WorkFailedException.
        /// </summary>
        public Task<SessionStatus> WaitForSessionAsync(string sessionId, IProgress<WorkProgress> progress = null,
                                                       bool cancelWorkOnCancel = false, bool requireSuccess = false,
                                                       CancellationToken cancellationToken = default(CancellationToken))
        {
            return WaitAsync(sessionId, () => GetSessionStatus(sessionId), progress,
                             cancelWorkOnCancel ? (Action)(() => ControlSession(sessionId, "cancel")) : null,
                             requireSuccess, cancellationToken);
        }

        /// <summary>The same for a batch: counts from the board while it runs.</summary>
        public Task<BatchStatus> WaitForBatchAsync(string batchId, IProgress<WorkProgress> progress = null,
                                                   bool cancelWorkOnCancel = false, bool requireSuccess = false,
                                                   CancellationToken cancellationToken = default(CancellationToken))
        {
            return WaitAsync(batchId, () => GetBatchStatus(batchId), progress,
                             cancelWorkOnCancel ? (Action)(() => ControlBatch(batchId, "cancel")) : null,
                             requireSuccess, cancellationToken);
        }

        async Task<T> WaitAsync<T>(string id, Func<T> poll, IProgress<WorkProgress> progress, Action cancelWork,
                                   bool requireSuccess, CancellationToken token) where T : StatusReading
        {
            long reported = -1;
            try
            {
                while (true)
                {
                    token.ThrowIfCancellationRequested();
                    var status = poll();
                    if (!status.Success) throw new WorkerException(status.ErrorCode, status.Error);
                    WorkProgress now;
                    if (progress != null && TryGetProgress(id, out now))
                    {
                        long sequence = now.ItemsDone * 1000003 + (long)(now.Percent * 100) * 7919 + now.DenoiseStep * 31
                                        + now.Status.GetHashCode();
                        if (sequence != reported) progress.Report(now);
                        reported = sequence;
                    }
                    if (status.IsFinal)
                    {
                        if (requireSuccess && status.Status != "completed")
                            throw new WorkFailedException(id, status.Status, status.Error, status.ErrorCode);
                        return status;
                    }
                    await Task.Delay(options.WaitPollInterval, token).ConfigureAwait(false);
                }
            }
            catch (OperationCanceledException) when (token.IsCancellationRequested && cancelWork != null)
            {
                cancelWork();  // asked for: the work stops too, not only the wait
                throw;
            }
        }
    }
}
