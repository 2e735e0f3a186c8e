// The errors a caller must handle, typed. Replies keep the protocol's
// envelope (`success`, `error`, `error_code`); `Reply.Code` and
// `StatusReading.Code` give the code as an enum, and `EnsureSuccess()` or the
// Wait* methods turn a failure into a WorkerException carrying it.
//
//   InvalidRequest     the request is wrong: fix the caller, do not retry
//   NotFound           no such session, batch, workflow or output
//   InvalidState       not in this status (pause a completed session)
//   ResourceExhausted  queue, memory or size limit: retry later or smaller
//   Unavailable        the worker or runtime is closed, or a model cannot load
//   Cancelled          the work was cancelled
//   Internal           a bug on the Python side, or pythonnet threw: the message says which
//
// Cancellation by a CancellationToken is OperationCanceledException, as
// everywhere in .NET; a wait that gives up cancels the work only when asked.
using System;

namespace EmbeddedWorker
{
    public enum WorkerErrorCode
    {
        None = 0,
        InvalidRequest,
        NotFound,
        InvalidState,
        ResourceExhausted,
        Unavailable,
        Cancelled,
        Internal,
        /// <summary>A code this library does not know yet (a newer worker): read ErrorCode.</summary>
        Other,
    }

    public static class WorkerErrorCodes
    {
        public static WorkerErrorCode Parse(string code)
        {
            switch (code)
            {
                case null: case "": return WorkerErrorCode.None;
                case "invalid_request": return WorkerErrorCode.InvalidRequest;
                case "not_found": return WorkerErrorCode.NotFound;
                case "invalid_state": return WorkerErrorCode.InvalidState;
                case "resource_exhausted": return WorkerErrorCode.ResourceExhausted;
                case "unavailable": return WorkerErrorCode.Unavailable;
                case "cancelled": return WorkerErrorCode.Cancelled;
                case "internal": return WorkerErrorCode.Internal;
                default: return WorkerErrorCode.Other;
            }
        }
    }

    /// <summary>A failed reply, as an exception: the code, the worker's message, the reply itself.</summary>
    public class WorkerException : Exception
    {
        public WorkerErrorCode Code { get; private set; }
        public string ErrorCode { get; private set; }
        public Reply Reply { get; private set; }
        /// <summary>The Python traceback when Python raised through the boundary (CSnakes' PythonInvocationException shows the same).</summary>
        public string PythonTraceback { get { return Reply != null ? Reply.PythonTraceback : null; } }

        public WorkerException(string errorCode, string message, Reply reply = null, Exception inner = null)
            : base(message ?? errorCode, inner)
        {
            ErrorCode = errorCode;
            Code = WorkerErrorCodes.Parse(errorCode);
            Reply = reply;
        }

        public override string ToString()
        {
            var shown = base.ToString();
            return PythonTraceback == null ? shown : shown + Environment.NewLine + "Python traceback:" + Environment.NewLine + PythonTraceback;
        }
    }

    /// <summary>Work that ended failed (or cancelled) while a caller waited for it to complete.</summary>
    public sealed class WorkFailedException : WorkerException
    {
        public string Status { get; private set; }

        public WorkFailedException(string id, string status, string error, string errorCode)
            : base(errorCode ?? (status == "cancelled" ? "cancelled" : "internal"),
                   "'" + id + "' ended " + status + (string.IsNullOrEmpty(error) ? "" : ": " + error))
        {
            Status = status;
        }
    }
}
