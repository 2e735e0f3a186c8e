// What a status poll answers, typed: only what ServiceProcessing reads, plus
// the progress figures the board holds. Served from the progress board while
// the work runs (no GIL, no call into Python); from Python for what the board
// does not hold (when it ended, why it failed, work the board does not list).
namespace EmbeddedWorker
{
    public abstract class StatusReading
    {
        public bool Success;
        public string Status;
        public string CompletedAt;
        public string Error;
        public string ErrorCode;
        /// <summary>Where this reading came from: the board (no Python call) or Python.</summary>
        public bool FromBoard;

        public WorkerErrorCode Code { get { return WorkerErrorCodes.Parse(ErrorCode); } }
        public bool IsFinal { get { return WorkStatus.IsFinal(Status); } }
    }

    /// <summary>The protocol's statuses, read in one place.</summary>
    public static class WorkStatus
    {
        /// <summary>True for the statuses work never leaves by itself: completed, failed, cancelled.</summary>
        public static bool IsFinal(string status)
        {
            return status == "completed" || status == "failed" || status == "cancelled";
        }
    }

    public sealed class SessionStatus : StatusReading
    {
        public int Progress;
        public int CurrentStep;

        internal SessionStatus Copy() { return (SessionStatus)MemberwiseClone(); }
    }

    public sealed class BatchStatus : StatusReading
    {
        public int ProcessedItems;
        public int FailedItems;
        public int TotalItems;

        internal BatchStatus Copy() { return (BatchStatus)MemberwiseClone(); }
    }

    /// <summary>One progress report, read from the board: what IProgress&lt;WorkProgress&gt; receives.</summary>
    public struct WorkProgress
    {
        public string Id;
        public string Status;
        /// <summary>0..100, with two decimals.</summary>
        public double Percent;
        public long CurrentStep, TotalSteps, DenoiseStep, DenoiseTotal;
        public long ItemsDone, ItemsFailed, ItemsTotal;
        /// <summary>Seconds left as the worker estimates them; null when it has no estimate yet.</summary>
        public double? EtaSeconds;

        internal static WorkProgress From(string id, BoardRow row)
        {
            return new WorkProgress
            {
                Id = id, Status = row.Status, Percent = row.ProgressBp / 100.0,
                CurrentStep = row.CurrentStep, TotalSteps = row.TotalSteps,
                DenoiseStep = row.DenoiseStep, DenoiseTotal = row.DenoiseTotal,
                ItemsDone = row.ItemsDone, ItemsFailed = row.ItemsFailed, ItemsTotal = row.ItemsTotal,
                EtaSeconds = row.EtaMs >= 0 ? row.EtaMs / 1000.0 : (double?)null,
            };
        }
    }
}
